"""The bad-input corpus: for every CLI, each kind of bad input ends with the exit code a script would give, one last
line that names the file, option or value and the problem (never a library's wrapper message), and no output that
looks complete. Inputs that are checked before anything is written leave no file in the run folder."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from entities.cli import main as entities_main
from prompts.fewshot import main as fewshot_main
from ssl3d.evaluate import main as evaluate_main
from ssl3d.finetune.cli import main as finetune_main
from ssl3d.pretrain import main as pretrain_main
from tests.finetune.helpers import make_encoder, segmentation_args, write_datalist
from tests.helpers.cli import complete_outputs, run_cli
from tests.prompts.tiny import TINY, make_image_folder
from tests.ssl3d.test_pretrain_cli import TINY_ARGS


@dataclass
class Case:
    main: Callable
    args: list[str]
    code: int
    message: str  # a regular expression the last line must match
    nothing_written: bool = False  # checked before any file is written to the run folder


# ------------------------------------------------------------------------------------------------ fewshot_eval
def fewshot_case(tmp_path, extra, code, message, per_split=(2, 1, 1), nothing_written=False, root=None):
    root = root or make_image_folder(tmp_path / "images", per_split=per_split)
    args = [
        f"--run_dir={tmp_path / 'run'}",
        "--seeds=[1]",
        "--shots=[1]",
        f"--model.init_args.model_name={TINY}",
        "--model.init_args.text_depth=1",
        "--model.init_args.vision_depth=1",
        "--data.dataset=imagefolder",
        f"--data.root={root}",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    return Case(fewshot_main, args, code, message, nothing_written)


def _garbage(path: Path, content: bytes = b"definitely not what it claims to be") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def fewshot_cases() -> dict[str, Callable[[Path], Case]]:
    def tiny_weights(tmp_path):
        from agreement.clip import build_clip

        path = tmp_path / "tiny.pt"
        torch.save(build_clip(TINY).model.state_dict(), path)
        return path

    def broken_image(which):
        def build(tmp_path):
            root = make_image_folder(tmp_path / "images", per_split=(2, 1, 1))
            _garbage(root / which / "cat" / "0.png")
            return fewshot_case(
                tmp_path, [], 1, rf"OSError: .*images.*1 image\(s\) cannot be read, e\.g\. .*{which}/cat/0\.png",
                nothing_written=True, root=root,
            )  # fmt: skip

        return build

    def class_without_training_images(tmp_path):
        root = make_image_folder(tmp_path / "images", per_split=(2, 1, 1))
        for image in (root / "train" / "dog").iterdir():
            image.unlink()
        return fewshot_case(
            tmp_path, [], 1, r"ValueError: .*images: 1 of 5 classes have no training images \(e\.g\. 'dog'\)",
            nothing_written=True, root=root,
        )  # fmt: skip

    def one_class(tmp_path):
        root = make_image_folder(tmp_path / "images", classes=["cat"], per_split=(2, 1, 1))
        return fewshot_case(
            tmp_path,
            [],
            1,
            r"base-to-novel needs at least 2 classes, found 1",
            nothing_written=True,
            root=root,
        )

    def classnames_file(tmp_path):
        names = tmp_path / "names.txt"
        names.write_text("a\nb\n")
        return fewshot_case(
            tmp_path, [f"--data.classnames_file={names}"], 1,
            r"class-name list .*names\.txt has 2 names but .*train has 5 class folders", nothing_written=True,
        )  # fmt: skip

    return {
        "missing weights file": lambda t: fewshot_case(
            t, [f"--model.init_args.pretrained={t / 'nope.pt'}"], 1,
            r"FileNotFoundError: pretrained='.*nope\.pt' is neither an existing file nor an open_clip tag",
            nothing_written=True,
        ),
        "weights of another architecture": lambda t: fewshot_case(
            t, [f"--model.init_args.pretrained={tiny_weights(t)}", "--model.init_args.model_name=prompts-demo-vit"],
            1, r"ValueError: checkpoint .*tiny\.pt does not match the open_clip architecture 'prompts-demo-vit'",
        ),
        "unreadable weights file": lambda t: fewshot_case(
            t, [f"--model.init_args.pretrained={_garbage(t / 'clip.pt')}"], 1,
            r"ValueError: .*clip\.pt: cannot read CLIP weights: it is not a torch file",
        ),
        "unreadable safetensors weights": lambda t: fewshot_case(
            t, [f"--model.init_args.pretrained={_garbage(t / 'clip.safetensors')}"], 1,
            r"ValueError: .*clip\.safetensors: cannot read CLIP weights: not a valid safetensors file",
        ),
        "weights given as a folder": lambda t: fewshot_case(
            t, [f"--model.init_args.pretrained={t}"], 1, r"is neither an existing file nor an open_clip tag",
            nothing_written=True,
        ),
        "more shots than images per class": lambda t: fewshot_case(
            t, ["--shots=[50]"], 1,
            r"ValueError: .*images: --shots 50 but 5 of 5 classes have fewer training images \(class '\w+' has 2\); "
            r"use --shots 2 or fewer",
            nothing_written=True,
        ),
        "unreadable test image": broken_image("test"),
        "unreadable training image": broken_image("train"),
        "class without training images": class_without_training_images,
        "one class for base-to-novel": one_class,
        "class-name list of another length": classnames_file,
        "several shot counts for one-shot-count protocol": lambda t: fewshot_case(
            t, ["--shots=[1, 2]"], 1, r"--protocol base2novel runs one shot count but --shots is \[1, 2\]",
            nothing_written=True,
        ),
        "targets for a protocol without targets": lambda t: fewshot_case(
            t, ["--targets=[OxfordPets]"], 1, r"--targets is used by --protocol cross_dataset or "
            r"domain_generalization only", nothing_written=True,
        ),
        "missing target dataset": lambda t: fewshot_case(
            t, ["--protocol=cross_dataset", f"--targets=[imagefolder:{t / 'nowhere'}]"], 1,
            r"FileNotFoundError: ImageFolder dataset .*nowhere needs train/ and test/", nothing_written=True,
        ),
        "no seeds": lambda t: fewshot_case(t, ["--seeds=[]"], 1, r"--seeds is empty", nothing_written=True),
        "missing prompt checkpoint": lambda t: fewshot_case(
            t, [f"--init_prompts={t / 'p.safetensors'}"], 1, r"prompt checkpoint .*p\.safetensors not found",
            nothing_written=True,
        ),
        "unreadable prompt checkpoint": lambda t: fewshot_case(
            t, [f"--init_prompts={_garbage(t / 'p.safetensors')}"], 1,
            r"p\.safetensors is not a prompt checkpoint: not a safetensors file", nothing_written=True,
        ),
        "unknown dataset": lambda t: fewshot_case(
            t, ["--data.dataset=OxfordPetz"], 1, r"unknown dataset 'OxfordPetz'", nothing_written=True
        ),
        "misspelt option": lambda t: fewshot_case(
            t, ["--model.init_args.n_ctxx=3"], 2,
            r"^error: .*'prompts\.PromptSRC': Option 'n_ctxx' is not accepted$", nothing_written=True,
        ),
        "value of the wrong type": lambda t: fewshot_case(
            t, ["--trainer.max_epochs=many"], 2, r"^error: .*trainer\.max_epochs.*expected int.*got 'many'$",
            nothing_written=True,
        ),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ finetune
def finetune_case(tmp_path, encoder, code, message, datalist=None, extra=()):
    datalist = datalist or write_datalist(tmp_path / "data", train=1, val=0, test=1)
    args = [*segmentation_args(datalist, encoder), f"--run_dir={tmp_path / 'run'}", *extra]
    return Case(finetune_main, args, code, message, nothing_written=True)


def finetune_cases() -> dict[str, Callable[[Path], Case]]:
    def other_architecture(tmp_path):
        folder = make_encoder(tmp_path / "enc", name="resnet10t")
        return finetune_case(
            tmp_path, folder, 1,
            r"^.*encoder\.safetensors \(exported from 'resnet10t'\) is not an encoder of 'test_efficientnet': "
            r"set the backbone to the timm model it was exported from",
        )  # fmt: skip

    def folder_without_metadata(tmp_path):
        folder = make_encoder(tmp_path / "enc")
        (folder / "encoder.json").unlink()
        return finetune_case(tmp_path, folder, 1, r"FileNotFoundError: .*enc holds no encoder\.json")

    def missing_volume(tmp_path):
        datalist = write_datalist(tmp_path / "data", train=1, val=0, test=1)
        next((tmp_path / "data" / "cases").glob("case0_image*")).unlink()
        return finetune_case(
            tmp_path, "null", 1,
            r"^FileNotFoundError: datalist .*datalist\.json: training entry 0: image .*case0_image\.nii\.gz does not exist$",
            datalist=datalist,
        )  # fmt: skip

    def corrupt_volume(tmp_path):
        datalist = write_datalist(tmp_path / "data", train=1, val=0, test=1)
        _garbage(next((tmp_path / "data" / "cases").glob("case0_label*")))
        return finetune_case(
            tmp_path,
            "null",
            1,
            r"^ValueError: .*case0_label\.nii\.gz: cannot be read as a NIfTI volume",
            datalist=datalist,
        )

    def checkpoint_folder_without_checkpoint(tmp_path):
        datalist = write_datalist(tmp_path / "data", train=1, val=0, test=1)
        root = Path(__file__).resolve().parents[1]
        (tmp_path / "run0").mkdir()
        args = [
            f"--config={root / 'configs' / 'finetune' / 'volume_classification.yaml'}",
            f"--model.init_args.encoder={tmp_path / 'run0'}",
            f"--data.init_args.datalist={datalist}",
            f"--run_dir={tmp_path / 'run'}",
        ]
        return Case(finetune_main, args, 1, r"run0: no .*last\.ckpt", nothing_written=True)

    return {
        "missing encoder": lambda t: finetune_case(
            t, t / "nope", 1, r"^FileNotFoundError: encoder weights not found: .*nope$"
        ),
        "encoder of another architecture": other_architecture,
        "encoder folder without encoder.json": folder_without_metadata,
        "unreadable safetensors encoder": lambda t: finetune_case(
            t, _garbage(t / "encoder.safetensors"), 1, r"encoder\.safetensors: cannot read weights: not a valid"
        ),
        "unreadable torch encoder": lambda t: finetune_case(
            t, _garbage(t / "encoder.pt"), 1, r"encoder\.pt: cannot read weights: it is not a torch file"
        ),
        "empty torch encoder": lambda t: finetune_case(
            t, _garbage(t / "encoder.pt", b""), 1, r"encoder\.pt: cannot read weights: it is empty or truncated"
        ),
        "missing datalist": lambda t: finetune_case(
            t, "null", 1, r"^FileNotFoundError: datalist .*nope\.json: file not found$", datalist=t / "nope.json"
        ),
        "datalist entry pointing nowhere": missing_volume,
        "corrupt label volume": corrupt_volume,
        "checkpoint folder without a checkpoint": checkpoint_folder_without_checkpoint,
        "misspelt option": lambda t: finetune_case(
            t, "null", 2, r"^error: .*'ssl3d\.finetune\.SegmentationTask': Option 'lrr' is not accepted$",
            extra=["--model.init_args.lrr=3"],
        ),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ pretrain
def pretrain_case(tmp_path, datalist_text, code, message, extra=()):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(datalist_text)
    args = [*TINY_ARGS, f"--data.datalist={datalist}", f"--run_dir={tmp_path / 'run'}", *extra]
    return Case(pretrain_main, args, code, message, nothing_written=True)


def pretrain_cases() -> dict[str, Callable[[Path], Case]]:
    def corrupt_volume(tmp_path):
        _garbage(tmp_path / "scan.nii.gz")
        return pretrain_case(
            tmp_path, json.dumps({"training": [{"image": "scan.nii.gz"}]}), 1, r"scan\.nii\.gz"
        )

    return {
        "datalist entry pointing nowhere": lambda t: pretrain_case(
            t, json.dumps({"training": [{"image": "missing.nii.gz"}]}), 1,
            r"^FileNotFoundError: datalist .*datalist\.json: entry 'missing\.nii\.gz' points to .* which does not exist",
        ),
        "datalist that is not JSON": lambda t: pretrain_case(
            t, "{training: [", 1, r"^ValueError: datalist .*datalist\.json: not valid JSON"
        ),
        "corrupt volume": corrupt_volume,
        "misspelt option": lambda t: pretrain_case(
            t, "{}", 2, r"^error: .*lambda_intar", extra=["--model.lambda_intar=2"]
        ),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ evaluate
GOOD_RUN_CONFIG = "seed_everything: 0\ndata:\n  size: [32, 32]\n  num_slices: 8\n  slice_axis: 2\n"


def evaluate_case(tmp_path, message, config=GOOD_RUN_CONFIG, checkpoint=None, unfinished=False):
    pretraining = tmp_path / "pretraining"
    pretraining.mkdir()
    if config is not None:
        (pretraining / "config.yaml").write_text(config)
    if checkpoint is not None:
        _garbage(pretraining / "checkpoints" / "last.ckpt", checkpoint)
    if unfinished:
        (pretraining / "UNFINISHED").write_text("running\n")
    args = ["cross-subject", f"--runs={pretraining}", f"--out_dir={tmp_path / 'run'}"]
    return Case(evaluate_main, args, 2, message, nothing_written=True)


def evaluate_cases() -> dict[str, Callable[[Path], Case]]:
    return {
        "missing run folder": lambda t: Case(
            evaluate_main, ["cross-subject", f"--runs={t / 'nope'}", f"--out_dir={t / 'run'}"], 2,
            r"^error: .*nope: no such run folder$", nothing_written=True,
        ),
        "misspelt true/false": lambda t: Case(
            evaluate_main, ["cross-subject", f"--runs={t}", "--volume=flase", f"--out_dir={t / 'run'}"], 2,
            r"argument --volume: expected true or false, got 'flase'", nothing_written=True,
        ),
        "unfinished run": lambda t: evaluate_case(t, r"pretraining: the run has not completed", unfinished=True),
        "folder without config": lambda t: evaluate_case(t, r"pretraining: no config\.yaml", config=None),
        "config that is not YAML": lambda t: evaluate_case(t, r"config\.yaml: not valid YAML", config="a: [b"),
        "config without data settings": lambda t: evaluate_case(
            t, r"config\.yaml: lacks data\.size", config="seed_everything: 0\n"
        ),
        "run without checkpoint": lambda t: evaluate_case(t, r"pretraining: no checkpoints/last\.ckpt$"),
        "unreadable checkpoint": lambda t: evaluate_case(
            t, r"last\.ckpt: cannot read pretraining checkpoint: it is not a torch file", checkpoint=b"not torch"
        ),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ discover_entities
def entities_case(tmp_path, args, code, message, nothing_written=False):
    return Case(entities_main, [*args, f"--run_dir={tmp_path / 'run'}"], code, message, nothing_written)


NO_FRAME = json.dumps([{"names": []}]).encode()


def entities_cases() -> dict[str, Callable[[Path], Case]]:
    def subtitles(tmp_path, text="1\n00:00:00,000 --> 00:00:02,000\nAnn: hello Bo\n"):
        path = tmp_path / "episode.srt"
        path.write_text(text)
        return path

    return {
        "missing records": lambda t: entities_case(
            t, [f"--records={t / 'faces.json'}"], 1, r"faces\.json: records file not found"
        ),
        "records that are not JSON": lambda t: entities_case(
            t, [f"--records={_garbage(t / 'faces.json')}"], 1, r"faces\.json: not valid JSON"
        ),
        "records of an unknown format": lambda t: entities_case(
            t, [f"--records={_garbage(t / 'faces.csv')}"], 1, r"faces\.csv: unsupported records format"
        ),
        "records without frames": lambda t: entities_case(
            t, [f"--records={_garbage(t / 'faces.json', NO_FRAME)}"], 1,
            r"faces\.json: face 0 has no 'frame' field",
        ),
        "video and records together": lambda t: entities_case(
            t, [f"--records={t / 'a.json'}", f"--video={t / 'a.avi'}"], 1, r"either --records or --video", True
        ),
        "video without subtitles": lambda t: entities_case(
            t, [f"--video={t / 'a.avi'}", "--names.cast=[Ann]"], 1, r"--video needs --subtitles", True
        ),
        "subtitles without lines": lambda t: entities_case(
            t, [f"--video={t / 'a.avi'}", f"--subtitles={subtitles(t, '')}", "--names.cast=[Ann]"], 1,
            r"episode\.srt: no timestamps found",
        ),
        "missing CLIP weights": lambda t: entities_case(
            t, [f"--video={t / 'a.avi'}", f"--subtitles={subtitles(t)}", "--names.cast=[Ann]",
                "--video_options.detector=opencv", "--video_options.embedder=open_clip",
                f"--video_options.clip_model={TINY}", f"--video_options.clip_weights={t / 'clip.pt'}"], 1,
            r"pretrained='.*clip\.pt' is neither an existing file nor an open_clip tag",
        ),
        "misspelt option": lambda t: entities_case(
            t, ["--discovery.clusters_per_entiti=3"], 2, r"^error: .*clusters_per_entiti"
        ),
        "empty cast list": lambda t: Case(
            entities_main, ["--names.cast=[]", f"--run_dir={t / 'run'}"], 1, r"--names\.cast is empty", True
        ),
    }  # fmt: skip


CASES = {
    **{f"fewshot: {k}": v for k, v in fewshot_cases().items()},
    **{f"finetune: {k}": v for k, v in finetune_cases().items()},
    **{f"pretrain: {k}": v for k, v in pretrain_cases().items()},
    **{f"evaluate: {k}": v for k, v in evaluate_cases().items()},
    **{f"entities: {k}": v for k, v in entities_cases().items()},
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_with_one_clear_line(tmp_path, name):
    case = CASES[name](tmp_path)
    outcome = run_cli(case.main, case.args)
    assert outcome.code == case.code, (outcome.code, outcome.last_line, outcome.error)
    assert re.search(case.message, outcome.last_line), outcome.last_line
    for wrapper in ("Union subtypes", "Given value", "Traceback", "weights_only"):
        assert wrapper not in outcome.last_line
    run_dir = tmp_path / "run"
    assert complete_outputs(run_dir) == [], complete_outputs(run_dir)
    if case.nothing_written:
        written = sorted(p for p in run_dir.rglob("*") if p.is_file()) if run_dir.exists() else []
        assert written == [], written
