"""The evaluation code reproduces the published SC-Friends metric values exactly."""

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from entities.cli import label_only_metrics
from entities.metrics import evaluate, evaluate_expected
from entities.names import Gazetteer
from entities.records import load_records
from entities.stages import weak_label_distribution, weak_label_graph

FIXTURE = Path(__file__).parent / "data" / "sc_friends_labels.json"


@pytest.fixture(scope="module")
def friends():
    header = json.loads(FIXTURE.read_text())["header"]
    records = load_records(FIXTURE)
    gazetteer = Gazetteer(header["classes"][:-1], exact=True)
    return header, records, gazetteer


def _value(entry):
    return float(Fraction(entry["exact"])) if isinstance(entry, dict) else entry


def test_fixture_counts(friends):
    header, records, gazetteer = friends
    assert len(records) == header["counts"]["boxes"] == 3386
    assert len(set(records.frames)) == header["counts"]["frames"]
    assert gazetteer.classes == header["classes"]


def test_stage2_published_labels(friends):
    header, records, gazetteer = friends
    expected = header["metrics"]["stage2_vs_label"]
    classes = gazetteer.classes
    index = {n: i for i, n in enumerate(classes)}
    y = np.array([index[n] for n in records.labels])
    pred = np.array([index[n] for n in records.extra["stage2_label"]])
    got = evaluate(y, pred, classes)
    assert got["accuracy"] == pytest.approx(_value(expected["accuracy"]), abs=1e-15)
    assert got["mean_per_class_accuracy"] == pytest.approx(
        _value(expected["mean_per_class_accuracy_7_classes"]), abs=1e-15
    )
    assert got["mean_per_class_accuracy_without_unknown"] == pytest.approx(
        _value(expected["mean_per_class_accuracy_without_Unknown_6_classes"]), abs=1e-15
    )
    assert got["nmi"] == pytest.approx(expected["nmi"], abs=1e-10)
    for name, recall in expected["per_class_accuracy"].items():
        assert got["per_class"][name]["recall"] == pytest.approx(recall, abs=1e-10)
    assert got["accuracy"] * 3386 == pytest.approx(2509)


def test_stage1_random_weak_label_expected(friends):
    header, records, gazetteer = friends
    expected = header["metrics"]["stage1_random_weak_label_expected"]
    classes = gazetteer.classes
    y = np.array([classes.index(n) for n in records.labels])
    weak = weak_label_graph([gazetteer.class_ids(n) for n in records.weak_names], len(classes))
    got = evaluate_expected(y, weak_label_distribution(weak, gazetteer.unknown_id), classes)
    assert got["accuracy"] == pytest.approx(_value(expected["accuracy"]), abs=1e-14)
    assert got["mean_per_class_accuracy"] == pytest.approx(
        _value(expected["mean_per_class_accuracy_7_classes"]), abs=1e-14
    )
    assert got["mean_per_class_accuracy_without_unknown"] == pytest.approx(
        _value(expected["mean_per_class_accuracy_without_Unknown_6_classes"]), abs=1e-14
    )
    for name, recall in expected["per_class_accuracy"].items():
        assert got["per_class"][name]["recall"] == pytest.approx(recall, abs=1e-10)


def test_label_only_run_metrics_include_all_unknown(friends):
    header, records, gazetteer = friends
    metrics = label_only_metrics(records, gazetteer)
    baseline = header["metrics"]["all_Unknown_baseline"]
    assert metrics["all Unknown"]["accuracy"] == pytest.approx(_value(baseline["accuracy"]), abs=1e-15)
    assert metrics["all Unknown"]["mean_per_class_accuracy"] == pytest.approx(1 / 7, abs=1e-15)
    assert metrics["all Unknown"]["mean_per_class_accuracy_without_unknown"] == 0.0
    assert metrics["stage 2: published labels"]["accuracy"] == pytest.approx(2509 / 3386, abs=1e-15)
