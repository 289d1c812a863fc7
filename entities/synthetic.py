"""A synthetic captioned episode with the biases of real TV data, for the default run, tests and benchmarks.

No captioned video with named faces installs from a package registry, so the default run generates one at the
level of face records. The generator reproduces what makes the task hard in SC-Friends: skewed identity
frequencies, many minor people who count as "Unknown" (about a third of the faces), captions without names
(about 45%), speakers who are off screen (about 30%), names mentioned while that person is absent, cast members
who are rarely named while visible, several faces per frame, NER noise (name fragments, duplicates, unrelated
names), minor people who look like cast members, and identities with several appearance modes (lighting, pose,
make-up) so that k-means over-segments them. ``entities.evaluation`` draws a family of such episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from entities.names import UNKNOWN
from entities.records import FaceRecords

DEFAULT_CAST = ("Avery", "Blake", "Corin", "Dale", "Ellis", "Finley")


@dataclass
class EpisodeConfig:
    """Knobs of the synthetic episode; the defaults give SC-Friends-like statistics (~3,000 faces).

    ``quiet_cast`` members are named ``quiet_factor`` times as often while on screen; ``quiet_lead`` makes the
    most frequent person one of them. ``mention_noise`` is the chance that a caption also names somebody
    unrelated to the scene (anyone, cast or minor). ``lookalikes`` minor people look like a cast member (their
    centre lies ``lookalike_distance`` from it). A scene shows ``people_per_scene`` (inclusive range) people and
    a frame a geometric(``face_count_p``) number of them (mean ``1 / face_count_p``).
    """

    cast: tuple[str, ...] = DEFAULT_CAST
    num_minor: int = 40
    num_scenes: int = 120
    frames_per_scene: int = 12
    dim: int = 64
    modes_per_identity: int = 3
    mode_spread: float = 0.8
    noise: float = 0.45
    unknown_share: float = 0.36
    cast_skew: float = 0.6
    caption_probability: float = 0.55
    speaker_visible: float = 0.7
    off_screen_mentions: float = 0.6
    quiet_cast: int = 2
    quiet_factor: float = 0.25
    quiet_lead: bool = False
    fragment_noise: float = 0.05
    mention_noise: float = 0.0
    lookalikes: int = 0
    lookalike_distance: float = 0.6
    people_per_scene: tuple[int, int] = (2, 5)
    face_count_p: float = 0.55
    seconds_per_frame: float = 1.0 / 3.0
    seed: int = 0


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_episode(config: EpisodeConfig | None = None) -> tuple[FaceRecords, list[str]]:
    """Generate face records (embeddings, frames, times, weak names, true names) and the cast list."""
    c = config or EpisodeConfig()
    rng = np.random.default_rng(c.seed)
    cast = list(c.cast)
    minor = [f"Extra{i:02d}" for i in range(c.num_minor)]
    people = cast + minor
    # Identity frequencies: cast by a power law, the rest split over minor people (also skewed).
    cast_weights = (1.0 / np.arange(1, len(cast) + 1)) ** c.cast_skew
    minor_weights = (1.0 / np.arange(1, c.num_minor + 1)) ** 1.0
    freq = np.concatenate(
        [
            (1 - c.unknown_share) * cast_weights / cast_weights.sum(),
            c.unknown_share * minor_weights / minor_weights.sum(),
        ]
    )
    # Appearance: an identity centre plus a few modes around it, then per-face noise.
    centres = _unit(rng, len(people), c.dim)
    if c.lookalikes:
        doubles = np.arange(len(cast), min(len(people), len(cast) + c.lookalikes))
        originals = centres[doubles % len(cast)]
        centres[doubles] = originals + c.lookalike_distance * _unit(rng, len(doubles), c.dim)
        centres[doubles] /= np.linalg.norm(centres[doubles], axis=1, keepdims=True)
    modes = centres[:, None, :] + c.mode_spread * _unit(
        rng, len(people) * c.modes_per_identity, c.dim
    ).reshape(len(people), c.modes_per_identity, c.dim)
    # Some cast members are rarely named while they are on screen (they speak little and are addressed rarely).
    quiet = set(rng.choice(len(cast), size=min(c.quiet_cast, len(cast)), replace=False).tolist())
    if c.quiet_lead:
        quiet = {0} | set(sorted(quiet - {0})[: max(0, c.quiet_cast - 1)])
    talk = np.where([i in quiet for i in range(len(people))], c.quiet_factor, 1.0)

    frames, times, weak, labels, vectors = [], [], [], [], []
    frame_index = 0
    for scene in range(c.num_scenes):
        size = int(rng.integers(c.people_per_scene[0], c.people_per_scene[1] + 1))
        present = rng.choice(len(people), size=size, replace=False, p=freq)
        scene_mode = rng.integers(c.modes_per_identity, size=len(people))
        for _ in range(c.frames_per_scene):
            count = min(size, int(rng.geometric(c.face_count_p)))
            weights = freq[present] / freq[present].sum()
            visible = rng.choice(present, size=max(1, count), replace=False, p=weights)
            names: list[str] = []
            if rng.random() < c.caption_probability:
                if rng.random() < c.speaker_visible:
                    pool = visible
                else:
                    absent = np.setdiff1d(present, visible)
                    pool = absent if absent.size else rng.choice(len(people), size=1, p=freq)
                pool_weights = talk[pool] * freq[pool]
                speaker = int(rng.choice(pool, p=pool_weights / pool_weights.sum()))
                names.append(people[speaker])
                if rng.random() < c.off_screen_mentions:
                    # A mention, usually of someone not in the frame (talked about, not shown).
                    mentioned = int(rng.choice(len(cast), p=cast_weights / cast_weights.sum()))
                    if mentioned not in visible or rng.random() < 0.3 * talk[mentioned]:
                        names.append(cast[mentioned])
                if c.mention_noise and rng.random() < c.mention_noise:
                    names.append(people[int(rng.integers(len(people)))])
                if rng.random() < c.fragment_noise:
                    names.append(names[-1][:2])
                if rng.random() < c.fragment_noise:
                    names.append(names[0])
            key = f"scene{scene:03d}/frame{frame_index:05d}"
            for person in visible:
                mode = scene_mode[person] if rng.random() < 0.8 else rng.integers(c.modes_per_identity)
                vectors.append(
                    modes[person, mode] + c.noise * rng.standard_normal(c.dim) / np.sqrt(c.dim) * 4
                )
                frames.append(key)
                times.append(frame_index * c.seconds_per_frame)
                weak.append(list(names))
                labels.append(people[person] if person < len(cast) else UNKNOWN)
            frame_index += 1
    records = FaceRecords(
        frames=frames,
        weak_names=weak,
        embeddings=np.asarray(vectors, dtype=np.float32),
        labels=labels,
        times=np.asarray(times),
        source="synthetic episode",
    )
    return records, cast
