"""``scripts/discover_entities.py``: name the people of a captioned video, of face records, or of the built-in
synthetic episode, and write the run folder (names, metrics, gallery, resolved config).

python scripts/discover_entities.py                                  # synthetic episode, prints the stage table
python scripts/discover_entities.py --video ep.mp4 --subtitles ep.srt --cast '[Ross, Rachel]'
python scripts/discover_entities.py --records faces.parquet --cast '[...]'
python scripts/discover_entities.py --print_config                   # every option with its value
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jsonargparse import ActionConfigFile, ArgumentParser

from agreement.inputs import report_root_cause
from agreement.runs import run_folder, save_config, write_summary
from entities.metrics import evaluate, evaluate_expected, per_class_table, stage_table
from entities.names import UNKNOWN, Gazetteer
from entities.outputs import summary_counts, write_gallery, write_metrics, write_names
from entities.pipeline import DiscoveryOptions, DiscoveryResult, discover_records, names_to_ids
from entities.records import FaceRecords, RecordsError, load_records
from entities.selftrain import self_training_comparison
from entities.stages import weak_label_distribution, weak_label_graph
from entities.synthetic import EpisodeConfig, make_episode
from entities.video import VideoOptions, records_from_video

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "entities" / "default.yaml"


@dataclass
class SelfTrainingOptions:
    """The Lightning linear head on frozen embeddings: self-training on agreed names, and the oracle."""

    enabled: bool = True
    epochs: int = 30
    lr: float = 0.05


@dataclass
class NameOptions:
    """Cast and name matching: an explicit cast, or the ``num_cast`` most frequent weak names."""

    cast: list[str] | None = None
    num_cast: int = 6
    aliases: dict[str, list[str]] = field(default_factory=dict)
    min_similarity: float = 0.8
    exact: bool = False


def infer_cast(weak_names: list[list[str]], num_cast: int) -> list[str]:
    """The paper's vocabulary: the ``num_cast`` most frequent name tokens (ties by first appearance)."""
    counts = Counter(token for names in weak_names for token in names if token and token != UNKNOWN)
    if not counts:
        raise RecordsError("no weak names to build a cast from; give the cast with --names.cast")
    return [name for name, _ in counts.most_common(num_cast)]


def check_arguments(
    records: str | None, video: str | None, subtitles: str | None, cast: list[str] | None
) -> None:
    """The checks that need no file: one input, a video's subtitles, and an explicit cast list that names
    somebody (``None``, not given, means the most frequent weak names)."""
    if cast is not None and not any(str(name).strip() for name in cast):
        raise ValueError(
            "--names.cast is empty: give the main people (--names.cast '[Ross, Rachel]'), or leave the option "
            "out to use the most frequent weak names"
        )
    if records and video:
        raise ValueError("give either --records or --video, not both")
    if video and not subtitles:
        raise ValueError("--video needs --subtitles (an SRT or WebVTT file)")


def label_only_metrics(records: FaceRecords, gazetteer: Gazetteer) -> dict[str, dict[str, Any]]:
    """Metrics that need no embeddings: stage 1 (expected), a published stage-2 column, all-Unknown."""
    classes, unknown = gazetteer.classes, gazetteer.unknown_id
    y = names_to_ids(records.labels, classes)
    weak = weak_label_graph([gazetteer.class_ids(n) for n in records.weak_names], len(classes))
    results = {
        "stage 1: random weak label (expected)": evaluate_expected(
            y, weak_label_distribution(weak, unknown), classes
        )
    }
    if "stage2_label" in records.extra:
        published = names_to_ids(records.extra["stage2_label"], classes)
        results["stage 2: published labels"] = evaluate(y, published, classes)
    results["all Unknown"] = evaluate(y, np.full(len(y), unknown), classes)
    return results


@dataclass
class LoadedInput:
    """What a run discovers entities in: the face records, where they came from, and the cast."""

    data: FaceRecords
    source: str
    cast: list[str]
    gazetteer: Gazetteer


def load_input(
    records: str | None,
    video: str | None,
    subtitles: str | None,
    names: NameOptions,
    video_options: VideoOptions,
    episode: EpisodeConfig,
    out: Path,
) -> LoadedInput:
    """Face records from a file, a captioned video (face crops under ``out``) or the synthetic episode, and
    the cast (given, or the most frequent weak names)."""
    cast = names.cast
    if records:
        data, source = load_records(records), records
    elif video:
        if not cast:
            raise ValueError("--video needs the cast list (--names.cast '[Name1, Name2]')")
        gazetteer = Gazetteer(cast, names.aliases, names.min_similarity, names.exact)
        data = records_from_video(video, subtitles, gazetteer, video_options, crops_dir=out / "crops")
        source = video
    else:
        data, cast = make_episode(episode)
        source = "synthetic episode"
    if cast is None:
        cast = infer_cast(data.weak_names, names.num_cast)
    return LoadedInput(data, source, cast, Gazetteer(cast, names.aliases, names.min_similarity, names.exact))


def score(
    loaded: LoadedInput, result: DiscoveryResult | None, self_training: SelfTrainingOptions, seed: int
) -> dict[str, dict[str, Any]]:
    """Metrics against the records' labels, when they have some: every stage, and on held-out frames the
    self-trained linear head against a supervised oracle; without embeddings, the label-only metrics."""
    data = loaded.data
    if result is None:
        return label_only_metrics(data, loaded.gazetteer)
    if data.labels is None:
        return {}
    metrics = result.evaluate(data.labels)
    if self_training.enabled:
        truth = names_to_ids(data.labels, result.classes)
        heads = self_training_comparison(
            data.embeddings, result.stage3, truth, data.frame_ids(), len(result.classes),
            self_training.epochs, self_training.lr, seed,
        )  # fmt: skip
        held = ~heads["train_mask"]
        metrics["held-out: stage 3"] = evaluate(truth[held], result.stage3[held], result.classes)
        metrics["held-out: self-trained head"] = evaluate(
            truth[held], heads["self_training_held_out"], result.classes
        )
        metrics["held-out: supervised oracle"] = evaluate(truth[held], heads["oracle"], result.classes)
    return metrics


def write_outputs(
    loaded: LoadedInput, result: DiscoveryResult | None, metrics: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Names (JSON, CSV), gallery and metrics (JSON, Markdown) under ``out``; returns the summary's entries."""
    data = loaded.data
    summary: dict[str, Any] = {
        "source": loaded.source,
        "faces": len(data),
        "frames": len(set(data.frames)),
        "cast": loaded.cast,
    }
    if result is not None:
        summary["names_json"], summary["names_csv"] = map(str, write_names(data, result, out))
        gallery = write_gallery(data, result, out)
        summary["gallery"] = str(gallery) if gallery else None
        summary["faces_per_name"] = summary_counts(result)
        summary["refine_passes"] = result.refine_passes
    if metrics:
        summary["metrics_json"], summary["metrics_md"] = map(
            str, write_metrics(metrics, loaded.gazetteer.classes, out)
        )
        summary["stage_table"] = stage_table(metrics)
    return summary


def run(
    records: str | None = None,
    video: str | None = None,
    subtitles: str | None = None,
    names: NameOptions = NameOptions(),  # noqa: B008 - dataclass defaults are the config schema
    discovery: DiscoveryOptions = DiscoveryOptions(),  # noqa: B008
    video_options: VideoOptions = VideoOptions(),  # noqa: B008
    episode: EpisodeConfig = EpisodeConfig(),  # noqa: B008
    self_training: SelfTrainingOptions = SelfTrainingOptions(),  # noqa: B008
    run_dir: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Discover entities and write the run folder: load -> discover -> score -> write. Returns a summary (also
    written as ``summary.json``).

    Args:
        records: JSON or Parquet face records (frame, names, embedding, optional label); excludes ``video``.
        video: a video file; needs ``subtitles`` (SRT or WebVTT).
        subtitles: the subtitle file of ``video``.
        names: cast list and name matching.
        discovery: stage 2 and 3 settings.
        video_options: frame sampling and face backends for ``video``.
        episode: the synthetic episode used when neither ``records`` nor ``video`` is given.
        self_training: the Lightning linear head.
        run_dir: output folder (default ``runs/entities/<timestamp>``).
        seed: seeds k-means, the stage-1 draw and the linear heads.
    """
    check_arguments(records, video, subtitles, names.cast)
    out = run_folder(run_dir, "entities")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = load_input(records, video, subtitles, names, video_options, episode, out)
    data = loaded.data
    if data.embeddings is None and data.labels is None:
        raise RecordsError(
            f"{loaded.source}: records without embeddings or labels: nothing to discover or score"
        )
    result = (
        None if data.embeddings is None else discover_records(data, loaded.gazetteer, discovery, seed=seed)
    )
    metrics = score(loaded, result, self_training, seed)
    summary = write_outputs(loaded, result, metrics, out)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["run_dir"] = str(out)
    write_summary(out, {k: v for k, v in summary.items() if k != "stage_table"})
    print_summary(summary, metrics, loaded.gazetteer.classes)
    return summary


def print_summary(summary: dict[str, Any], metrics: dict[str, Any], classes: list[str]) -> None:
    print(
        f"\nEntity discovery on {summary['source']}: {summary['faces']} faces in {summary['frames']} frames"
    )
    print(f"cast: {', '.join(summary['cast'])} (+ {UNKNOWN})")
    if metrics:
        print("\n" + stage_table(metrics))
        print("\nPer-class recall / precision:\n" + per_class_table(metrics, classes))
    elif "faces_per_name" in summary:
        print("faces per name: " + ", ".join(f"{k} {v}" for k, v in summary["faces_per_name"].items()))
    print(f"\nRun folder: {summary['run_dir']} ({summary['seconds']} s)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="discover_entities",
        description="Self-contained entity discovery in captioned videos",
        default_config_files=[str(DEFAULT_CONFIG)],
        exit_on_error=False,  # parser errors are printed by report_root_cause
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file")
    parser.add_function_arguments(run)
    return parser


@report_root_cause
def main(args: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    config = parser.parse_args(args)
    init = parser.instantiate_classes(config)
    kwargs = {k: v for k, v in vars(init).items() if k not in ("config", "__default_config__")}
    # Before the run folder is written:
    check_arguments(kwargs["records"], kwargs["video"], kwargs["subtitles"], kwargs["names"].cast)
    out = run_folder(kwargs["run_dir"], "entities")
    kwargs["run_dir"] = config.run_dir = str(out)
    save_config(parser, config, out)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return run(**kwargs)
