import pytest

from entities.names import Gazetteer, caption_names, report_out_of_cast
from entities.subtitles import SubtitleError, lines_at, parse_subtitles, split_speaker


def test_srt_with_tvqa_speaker_tags(tmp_path):
    path = tmp_path / "a.srt"
    path.write_text(
        "1\n00:00:01,000 --> 00:00:02,500\n(Ross:) Hi, Rachel!\n\n"
        "2\n00:00:03,000 --> 00:00:04,000\nJust some text\nover two lines\n\n"
        "3\n01:00:00.5 --> 01:00:01,250\nMonica: Who's that?\n"
    )
    cues = parse_subtitles(path)
    assert [(c.start, c.end, c.speaker) for c in cues] == [
        (1.0, 2.5, "Ross"),
        (3.0, 4.0, None),
        (3600.5, 3601.25, "Monica"),
    ]
    assert cues[0].text == "Hi, Rachel!"
    assert cues[1].text == "Just some text over two lines"
    assert [c.speaker for c in lines_at(cues, 2.7, window=0.25)] == ["Ross"]


def test_webvtt_with_voice_tags_and_notes(tmp_path):
    path = tmp_path / "a.vtt"
    path.write_text(
        "WEBVTT\n\nNOTE a comment\nspanning lines\n\nintro\n00:01.000 --> 00:02.000 align:start\n"
        "<v Phoebe>Hello <i>there</i>\n\n00:00:03.000 --> 00:00:04.000\nplain\n"
    )
    cues = parse_subtitles(path)
    assert [(c.start, c.speaker, c.text) for c in cues] == [
        (1.0, "Phoebe", "Hello there"),
        (3.0, None, "plain"),
    ]


def test_split_speaker_forms():
    assert split_speaker("(Joey:)How you doin'?") == ("Joey", "How you doin'?")
    assert split_speaker("no tag: here") == (None, "no tag: here")


def test_subtitles_without_timestamps_raise(tmp_path):
    path = tmp_path / "plain.srt"
    path.write_text("1\nHello there\n\n2\nGeneral Kenobi\n")
    with pytest.raises(SubtitleError, match="no timestamps"):
        parse_subtitles(path)


def test_subtitles_with_negative_times_raise(tmp_path):
    path = tmp_path / "neg.srt"
    path.write_text("1\n-00:00:01,000 --> 00:00:02,000\nHi\n")
    with pytest.raises(SubtitleError, match="negative time"):
        parse_subtitles(path)
    path.write_text("1\n00:00:05,000 --> 00:00:02,000\nHi\n")
    with pytest.raises(SubtitleError, match="ends"):
        parse_subtitles(path)


def test_overlapping_subtitles_warn_with_count(tmp_path):
    path = tmp_path / "overlap.srt"
    path.write_text(
        "1\n00:00:01,000 --> 00:00:03,000\n(A:) one\n\n2\n00:00:02,000 --> 00:00:04,000\n(B:) two\n\n"
        "3\n00:00:03,500 --> 00:00:05,000\n(C:) three\n\n4\n00:00:06,000 --> 00:00:07,000\nfour\n"
    )
    with pytest.warns(UserWarning, match="2 of 4 caption lines overlap"):
        cues = parse_subtitles(path)
    assert {c.speaker for c in lines_at(cues, 2.5)} == {"A", "B"}


def test_gazetteer_tolerant_matching():
    gazetteer = Gazetteer(["Phoebe", "Rachel Green"], aliases={"Rachel Green": ["Rach"]})
    assert gazetteer.match("phoebe") == "Phoebe"
    assert gazetteer.match("Pheobe") == "Phoebe"  # misspelt
    assert gazetteer.match("Phoebe's") == "Phoebe"  # possessive
    assert gazetteer.match("Rach") == "Rachel Green"
    assert gazetteer.match("Green") == "Rachel Green"
    assert gazetteer.match("Gunther") is None
    assert gazetteer.class_ids(["Rach", "Gunther", "Rach"]) == [1, 2, 1]
    exact = Gazetteer(["Phoebe"], exact=True)
    assert exact.match("phoebe") is None and exact.match("Phoebe") == "Phoebe"
    with pytest.raises(ValueError, match="duplicates"):
        Gazetteer(["A", "A"])


def test_caption_names_from_tags_cast_mentions_and_ner():
    gazetteer = Gazetteer(["Ross", "Monica"])
    assert caption_names("Have you seen Monica? Tomorrow.", "Ross", gazetteer) == ["Ross", "Monica"]
    ner = lambda text: ["Paul Stevens"] if "Paul" in text else []  # noqa: E731
    assert caption_names("Monica, this is Paul Stevens.", None, gazetteer, ner) == [
        "Paul",
        "Stevens",
        "Monica",
    ]


def test_names_outside_the_cast_warn_with_counts():
    gazetteer = Gazetteer(["Ross"])
    with pytest.warns(UserWarning, match=r"3 name tokens \(2 distinct\) are not in the cast"):
        assert report_out_of_cast([["Ross", "Paul"], ["Paul"], ["Carol"]], gazetteer) == 3


def test_one_stray_byte_only_changes_its_own_line(tmp_path):
    path = tmp_path / "stray.srt"
    text = "1\n00:00:01,000 --> 00:00:02,000\n(José:) Hola\n\n2\n00:00:03,000 --> 00:00:04,000\n(Ann:) bad BYTE\n"
    path.write_bytes(text.encode("utf-8").replace(b"BYTE", b"\xff"))
    with pytest.warns(UserWarning, match=r"stray\.srt: 1 line\(s\) are not valid UTF-8 .*\(line 7\)"):
        cues = parse_subtitles(path)
    assert [c.speaker for c in cues] == ["José", "Ann"]
    assert cues[1].text == "bad \xff"


def test_latin1_file_reads_with_a_warning_naming_the_lines(tmp_path):
    path = tmp_path / "latin1.srt"
    path.write_bytes("1\n00:00:01,000 --> 00:00:02,000\n(José:) Olá, Zoë\n".encode("iso-8859-1"))
    with pytest.warns(UserWarning, match=r"latin1\.srt: 1 line\(s\) .* \(line 3\)"):
        cues = parse_subtitles(path)
    assert (cues[0].speaker, cues[0].text) == ("José", "Olá, Zoë")
