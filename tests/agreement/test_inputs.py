import argparse

import pytest
import torch

from agreement.inputs import check_files, load_state_dict_file, parse_boolean, state_mismatches


def read_number(path):
    text = path.read_text()
    if not text.isdigit():
        raise ValueError(f"{path}: not a number")
    return int(text)


def test_check_files_raises_on_the_first_bad_file_or_skips_with_one_warning(tmp_path):
    paths = []
    for name, text in (("a", "1"), ("b", "x"), ("c", "3"), ("d", "y")):
        paths.append(tmp_path / name)
        paths[-1].write_text(text)
    with pytest.raises(ValueError, match=r"b: not a number"):
        check_files(paths, read_number, "numbers")
    loaded = []
    with pytest.warns(UserWarning, match=r"skipped 2 of 4 numbers:\n.*b: not a number\n.*d: not a number"):
        good = check_files(
            paths, read_number, "numbers", skip_bad_files=True, on_loaded=lambda *a: loaded.append(a)
        )
    assert good == [paths[0], paths[2]] and loaded == [(0, paths[0], 1), (2, paths[2], 3)]


def test_state_dict_files_and_their_mismatches(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "nested.pt")
    state = load_state_dict_file(tmp_path / "nested.pt")
    assert state.keys() == model.state_dict().keys() and state_mismatches(state, model) == []
    wrong = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    lines = state_mismatches(wrong, model)
    assert lines == [
        "  missing keys (1): bias",
        "  unexpected keys (1): extra",
        "  shape mismatches (1): weight (2, 4) vs (2, 3)",
    ]
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt: does not hold weights"):
        load_state_dict_file(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*none\.pt"):
        load_state_dict_file(tmp_path / "none.pt")


def test_parse_boolean_refuses_what_it_cannot_read():
    assert parse_boolean("True") is True and parse_boolean("no") is False and parse_boolean("1") is True
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false, got 'flase'"):
        parse_boolean("flase")
