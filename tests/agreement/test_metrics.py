import itertools

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.metrics.cluster import contingency_matrix as sk_contingency

from agreement.metrics import (
    ari,
    cluster_accuracy,
    cluster_usage,
    contingency_matrix,
    mutual_information,
    nmi,
    per_class_accuracy,
    purity,
)

# (seed, n, classes, clusters): same and different numbers of clusters, plus tiny and lopsided cases.
LABELINGS = [(0, 200, 5, 5), (1, 300, 4, 9), (2, 150, 10, 3), (3, 7, 3, 2), (4, 500, 2, 20), (5, 60, 6, 1)]


def _random_labels(seed, n, classes, clusters):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, n)
    # Correlate the prediction with the truth so the scores are not all near zero.
    pred = np.where(rng.random(n) < 0.5, true % clusters, rng.integers(0, clusters, n))
    # Sparse, shifted ids: only relative identity matters.
    return true * 3 - 4, pred * 7 + 100


@pytest.mark.parametrize("case", LABELINGS)
def test_contingency_matches_sklearn(case):
    true, pred = _random_labels(*case)
    np.testing.assert_array_equal(contingency_matrix(true, pred), sk_contingency(true, pred))


@pytest.mark.parametrize("case", LABELINGS)
@pytest.mark.parametrize("method", ["min", "geometric", "arithmetic", "max"])
def test_nmi_matches_sklearn(case, method):
    true, pred = _random_labels(*case)
    expected = skm.normalized_mutual_info_score(true, pred, average_method=method)
    assert nmi(true, pred, average_method=method) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("case", LABELINGS)
def test_ari_matches_sklearn(case):
    true, pred = _random_labels(*case)
    assert ari(true, pred) == pytest.approx(skm.adjusted_rand_score(true, pred), abs=1e-12)


@pytest.mark.parametrize(
    "true, pred",
    [
        ([0, 0, 0, 0], [1, 1, 1, 1]),  # one group each: perfect
        ([0, 1, 2, 3], [3, 2, 1, 0]),  # all singletons: perfect
        ([0, 0, 0, 0], [0, 1, 2, 3]),  # one side constant: MI is zero
        ([0, 0, 1, 1], [0, 1, 0, 1]),  # independent
        ([5], [2]),
    ],
)
def test_degenerate_cases_match_sklearn(true, pred):
    assert nmi(true, pred) == pytest.approx(skm.normalized_mutual_info_score(true, pred), abs=1e-12)
    assert ari(true, pred) == pytest.approx(skm.adjusted_rand_score(true, pred), abs=1e-12)


def test_ari_large_counts_do_not_overflow():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 2, 300_000)
    pred = np.where(rng.random(true.size) < 0.9, true, 1 - true)
    assert ari(true, pred) == pytest.approx(skm.adjusted_rand_score(true, pred), abs=1e-9)


def test_cluster_accuracy_permutation_is_perfect():
    true = np.array([0, 0, 1, 1, 2, 2, 3])
    perm = np.array([2, 3, 0, 1])
    assert cluster_accuracy(true, perm[true]) == 1.0
    assert cluster_accuracy(torch.as_tensor(true), torch.as_tensor(perm[true] + 10)) == 1.0


def test_cluster_accuracy_known_optimum():
    # Contingency (rows = classes, columns = clusters). Greedily taking the largest cell (0, 0) = 5 leaves
    # only (1, 1) = 0 and (2, 2) = 1: 6 correct. The optimum swaps: (0, 1) + (1, 0) + (2, 2) = 4 + 4 + 1 = 9.
    table = np.array([[5, 4, 0], [4, 0, 0], [0, 0, 1]])
    true = np.concatenate([np.full(table[i, j], i) for i in range(3) for j in range(3)])
    pred = np.concatenate([np.full(table[i, j], j) for i in range(3) for j in range(3)])
    assert cluster_accuracy(true, pred) == pytest.approx(9 / 14)


def test_cluster_accuracy_more_clusters_than_classes():
    # Class 0 split over clusters 0 and 1: only the larger half can be matched.
    true = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 1, 2, 2])
    assert cluster_accuracy(true, pred) == pytest.approx(5 / 6)
    # Fewer clusters than classes: everything in one cluster matches only the largest class.
    assert cluster_accuracy(true, np.zeros(6, dtype=int)) == pytest.approx(4 / 6)


def _brute_force_accuracy(true, pred):
    classes, clusters = np.unique(true), np.unique(pred)
    best = 0
    # Injective maps from the smaller side into the larger one.
    if clusters.size <= classes.size:
        for image in itertools.permutations(classes, clusters.size):
            mapping = dict(zip(clusters, image))
            best = max(best, sum(mapping[p] == t for t, p in zip(true, pred)))
    else:
        for image in itertools.permutations(clusters, classes.size):
            mapping = dict(zip(image, classes))
            best = max(best, sum(mapping.get(p) == t for t, p in zip(true, pred)))
    return best / true.size


@pytest.mark.parametrize("seed", range(8))
def test_cluster_accuracy_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 30))
    true = rng.integers(0, int(rng.integers(1, 5)), n)
    pred = rng.integers(0, int(rng.integers(1, 6)), n)
    assert cluster_accuracy(true, pred) == pytest.approx(_brute_force_accuracy(true, pred))


def test_purity_closed_form():
    true = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])
    # Cluster 0 majority 2 (class 0), cluster 1 majority 2 (classes 1 or 2 tie), cluster 2 majority 2.
    assert purity(true, pred) == pytest.approx(6 / 9)
    # Singleton clusters are always pure; purity is not symmetric and ignores cluster count.
    assert purity(true, np.arange(9)) == 1.0
    assert purity(true, np.zeros(9, dtype=int)) == pytest.approx(4 / 9)


@pytest.mark.parametrize("case", LABELINGS)
def test_purity_matches_contingency_definition(case):
    true, pred = _random_labels(*case)
    table = sk_contingency(true, pred)
    assert purity(true, pred) == pytest.approx(table.max(axis=0).sum() / true.size)


def test_per_class_accuracy_nan_and_ignore_index():
    true = np.array([0, 0, 1, 1, 1, 3, 3])
    pred = np.array([0, 1, 1, 1, 0, 3, 0])
    mean, per_class = per_class_accuracy(true, pred, num_classes=5)
    np.testing.assert_allclose(per_class[[0, 1, 3]], [0.5, 2 / 3, 0.5])
    assert np.isnan(per_class[2]) and np.isnan(per_class[4])
    assert mean == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert mean == pytest.approx(skm.balanced_accuracy_score(true, pred))

    mean_ignored, per_class_ignored = per_class_accuracy(true, pred, num_classes=5, ignore_index=3)
    assert np.isnan(per_class_ignored[3])
    assert mean_ignored == pytest.approx((0.5 + 2 / 3) / 2)

    # Out-of-range ignore_index (PyTorch style) drops those samples; out-of-range predictions are just wrong.
    mean_neg, per_class_neg = per_class_accuracy([0, -100, 1], [0, 1, -1], ignore_index=-100)
    assert per_class_neg.tolist() == [1.0, 0.0]
    assert mean_neg == pytest.approx(0.5)


def test_per_class_accuracy_infers_num_classes():
    _, per_class = per_class_accuracy(torch.tensor([0, 1]), torch.tensor([0, 4]))
    assert per_class.shape == (5,)


def test_cluster_usage():
    usage = cluster_usage(torch.tensor([0, 0, 1, 1]), num_clusters=4)
    assert usage["entropy"] == pytest.approx(np.log(2) / np.log(4))
    assert usage["empty"] == 2
    assert usage["largest_fraction"] == pytest.approx(0.5)
    uniform = cluster_usage(np.arange(12) % 3, num_clusters=3)
    assert uniform == {"entropy": pytest.approx(1.0), "empty": 0, "largest_fraction": pytest.approx(1 / 3)}
    collapsed = cluster_usage([2, 2, 2], num_clusters=5)
    assert collapsed["entropy"] == 0.0 and collapsed["empty"] == 4 and collapsed["largest_fraction"] == 1.0


@pytest.mark.parametrize(
    "fn",
    [cluster_accuracy, nmi, ari, purity, per_class_accuracy, contingency_matrix],
    ids=lambda f: f.__name__,
)
def test_label_validation(fn):
    with pytest.raises(ValueError, match="same length"):
        fn([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="labels_true is empty"):
        fn([], [])
    with pytest.raises(ValueError, match="labels_pred must be 1-D"):
        fn([0, 1], [[0, 1]])
    with pytest.raises(ValueError, match="integer labels"):
        fn(np.array([0.0, 1.0]), [0, 1])
    with pytest.raises(ValueError, match="integer labels"):
        fn(torch.tensor([0, 1]), torch.tensor([True, False]))


def test_other_validation():
    with pytest.raises(ValueError, match="average_method"):
        nmi([0, 1], [0, 1], average_method="harmonic")
    with pytest.raises(ValueError, match=r"labels_true must lie in \[0, 2\)"):
        per_class_accuracy([0, 2], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        per_class_accuracy([0, 1], [0, 1], num_classes=0)
    with pytest.raises(ValueError, match=r"assignments must lie in \[0, 3\)"):
        cluster_usage([0, 3], num_clusters=3)
    with pytest.raises(ValueError, match="num_clusters must be a positive integer"):
        cluster_usage([0], num_clusters=0)
    with pytest.raises(ValueError, match="assignments is empty"):
        cluster_usage(torch.zeros(0, dtype=torch.long), num_clusters=2)


def test_mutual_information_of_count_and_weight_tables():
    rng = np.random.default_rng(0)
    for shape in ((4, 6), (10, 3), (2, 2)):
        counts = rng.poisson(3.0, size=shape)
        counts[0] = 0  # an empty row (a label no face has)
        assert mutual_information(counts) == pytest.approx(
            skm.mutual_info_score(None, None, contingency=counts)
        )
        # Weights (scikit-learn takes counts only): H(rows) + H(columns) - H(rows, columns) of the joint.
        weights = counts * rng.uniform(0.5, 2.0, size=shape)
        joint = weights / weights.sum()

        def entropy(p):
            return -(p[p > 0] * np.log(p[p > 0])).sum()

        expected = entropy(joint.sum(1)) + entropy(joint.sum(0)) - entropy(joint.ravel())
        assert mutual_information(weights) == pytest.approx(expected, abs=1e-12)
        assert mutual_information(7.5 * weights) == pytest.approx(expected, abs=1e-12)
    independent = np.outer([1.0, 2.0, 3.0], [4.0, 1.0])
    assert mutual_information(independent) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(np.zeros((3, 3))) == 0.0 and mutual_information(np.ones((1, 4))) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        mutual_information(-independent)
    with pytest.raises(ValueError, match="2-D"):
        mutual_information(np.ones(3))
