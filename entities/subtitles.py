"""Subtitle files (SRT, WebVTT) as timed caption lines, with TVQA-style ``(Name:)`` speaker tags.

Times are seconds as floats. Malformed files raise ``SubtitleError`` naming the file and the line; overlapping
lines are legal in real subtitles (two speakers at once) and only produce a warning with their count.
"""

from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

_TIME = r"(-?)(?:(\d+):)?(\d{1,2}):(\d{1,2})(?:[.,](\d{1,3}))?"
_TIMING = re.compile(rf"^\s*{_TIME}\s*-->\s*{_TIME}(?:\s+.*)?$")
_ARROW = re.compile(r"-->")
# "(Ross:) text", "Ross: text" (a capitalised word of at most three tokens before a colon) and WebVTT "<v Ross>".
_PAREN_TAG = re.compile(r"^\s*\(\s*([^():]{1,40}?)\s*:\s*\)\s*")
_COLON_TAG = re.compile(r"^\s*([A-Z][\w.'-]*(?:\s+[A-Z][\w.'-]*){0,2})\s*:\s+")
_VOICE_TAG = re.compile(r"<v(?:\.[\w.]+)?\s+([^>]+)>")
_MARKUP = re.compile(r"<[^>]*>|\{\\[^}]*\}")


class SubtitleError(ValueError):
    """A subtitle file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class CaptionLine:
    """One subtitle cue: ``[start, end]`` in seconds, its text without markup, and the speaker tag if any."""

    start: float
    end: float
    text: str
    speaker: str | None = None

    def covers(self, time: float, window: float = 0.0) -> bool:
        return self.start - window <= time <= self.end + window


def _seconds(sign: str, hours: str | None, minutes: str, seconds: str, millis: str | None) -> float:
    value = (
        int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + int((millis or "0").ljust(3, "0")) / 1000
    )
    return -value if sign else value


def split_speaker(text: str) -> tuple[str | None, str]:
    """``"(Ross:) Hi."`` -> ``("Ross", "Hi.")``; also ``"Ross: Hi."`` and WebVTT ``"<v Ross>Hi."``."""
    voice = _VOICE_TAG.search(text)
    if voice:
        return voice.group(1).strip(), _MARKUP.sub("", text).strip()
    for pattern in (_PAREN_TAG, _COLON_TAG):
        match = pattern.match(text)
        if match:
            return match.group(1).strip(), _MARKUP.sub("", text[match.end() :]).strip()
    return None, _MARKUP.sub("", text).strip()


def _read_text(path: Path) -> str:
    """The file as UTF-8; lines that are not valid UTF-8 are decoded as Latin-1, with a warning naming them.

    Decoding line by line keeps one stray byte from turning every "é" of a UTF-8 file into "Ã©" (and every
    accented name into an unknown one); a whole Latin-1 file (as TVQA's) still reads as before.
    """
    if not path.is_file():
        raise SubtitleError(f"{path}: subtitle file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    lines = raw.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    decoded, fallback = [], []
    for number, line in enumerate(lines, start=1):
        try:
            decoded.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            decoded.append(line.decode("iso-8859-1"))  # every byte string decodes in Latin-1
            fallback.append(number)
    shown = ", ".join(map(str, fallback[:10])) + (
        f" and {len(fallback) - 10} more" if len(fallback) > 10 else ""
    )
    warnings.warn(
        f"{path}: {len(fallback)} line(s) are not valid UTF-8 and were read as Latin-1 (line {shown}); "
        "check the names on them or convert the file to UTF-8",
        stacklevel=3,
    )
    return "\n".join(decoded)


def parse_subtitles(path: str | Path) -> list[CaptionLine]:
    """Read an SRT or WebVTT file into caption lines sorted by start time.

    Raises ``SubtitleError`` for a missing file, a file without any timestamp line, a malformed or negative
    timestamp, a cue that ends before it starts, or a file with no caption lines. Overlapping cues give one
    ``UserWarning`` with their count.
    """
    path = Path(path)
    text = _read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    is_vtt = lines[0].strip().startswith("WEBVTT") if lines else False
    if not any(_ARROW.search(line) for line in lines):
        raise SubtitleError(
            f"{path}: no timestamps found (expected lines like '00:00:01,000 --> 00:00:02,500')"
        )
    cues: list[CaptionLine] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if is_vtt and line.strip().startswith(("NOTE", "STYLE", "REGION")):
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        if not _ARROW.search(line):
            i += 1
            continue
        match = _TIMING.match(line)
        if match is None:
            raise SubtitleError(f"{path}:{i + 1}: malformed timestamp line {line.strip()!r}")
        groups = match.groups()
        start, end = _seconds(*groups[:5]), _seconds(*groups[5:])
        if start < 0 or end < 0:
            raise SubtitleError(f"{path}:{i + 1}: negative time in {line.strip()!r}")
        if end < start:
            raise SubtitleError(f"{path}:{i + 1}: cue ends ({end:.3f}s) before it starts ({start:.3f}s)")
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() and not _ARROW.search(lines[i]):
            body.append(lines[i].strip())
            i += 1
        # A trailing numeric line right before the next timing line is the next SRT cue index.
        if body and i < len(lines) and _ARROW.search(lines[i]) and body[-1].isdigit():
            body.pop()
        speaker, content = split_speaker(" ".join(body))
        if content or speaker:
            cues.append(CaptionLine(start, end, content, speaker))
    if not cues:
        raise SubtitleError(f"{path}: timestamps found but no caption text")
    cues.sort(key=lambda cue: (cue.start, cue.end))
    overlaps = sum(1 for a, b in itertools.pairwise(cues) if b.start < a.end)
    if overlaps:
        warnings.warn(
            f"{path}: {overlaps} of {len(cues)} caption lines overlap the previous line in time; "
            "a frame in an overlap gets the names of every line it falls in",
            stacklevel=2,
        )
    return cues


def lines_at(cues: list[CaptionLine], time: float, window: float = 0.0) -> list[CaptionLine]:
    """Caption lines shown at ``time`` (seconds), widened by ``window`` seconds on each side."""
    return [cue for cue in cues if cue.covers(time, window)]
