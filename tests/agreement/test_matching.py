import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from agreement.matching import BipartiteGraph, cooccurrence_graph, hungarian_match


def _brute_force_cost(cost, maximize):
    rows, cols = cost.shape
    best = None
    if rows <= cols:
        for perm in itertools.permutations(range(cols), rows):
            total = cost[np.arange(rows), list(perm)].sum()
            best = total if best is None else (max(best, total) if maximize else min(best, total))
    else:
        for perm in itertools.permutations(range(rows), cols):
            total = cost[list(perm), np.arange(cols)].sum()
            best = total if best is None else (max(best, total) if maximize else min(best, total))
    return best


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 3)])
@pytest.mark.parametrize("maximize", [False, True])
def test_hungarian_matches_brute_force(shape, maximize):
    rng = np.random.default_rng(sum(shape) + maximize)
    cost = rng.random(shape)
    rows, cols = hungarian_match(torch.as_tensor(cost), maximize=maximize)
    assert rows.dtype == np.int64 and len(rows) == min(shape)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert cost[rows, cols].sum() == pytest.approx(_brute_force_cost(cost, maximize))


def test_hungarian_known_answer():
    cost = np.array([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
    rows, cols = hungarian_match(cost)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]
    rows, cols = hungarian_match(cost, maximize=True)
    assert cost[rows, cols].sum() == 11  # 4 + 5 + 2


def test_hungarian_validation():
    with pytest.raises(ValueError, match="2-D"):
        hungarian_match(np.ones(3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        hungarian_match(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        hungarian_match(np.array([[1.0, np.inf], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="numeric"):
        hungarian_match(np.array([["a", "b"]]))


def test_cooccurrence_counts_and_weights():
    # Faces (left ids) and names (right ids) seen together in three frames.
    left = [[0, 1], [0], [2, 2]]
    right = [[0], [0, 1], [1]]
    graph = cooccurrence_graph(left, right, weights=[1.0, 2.0, 0.5])
    expected = np.array([[3.0, 2.0], [1.0, 0.0], [0.0, 0.5]])  # face 2 repeated in one group counts once
    np.testing.assert_allclose(graph.to_dense(), expected)
    assert graph.shape == (3, 2) and not graph.is_sparse
    np.testing.assert_allclose(graph.row_sums(), [5.0, 1.0, 0.5])
    np.testing.assert_allclose(graph.column_sums(), [4.0, 2.5])


def test_cooccurrence_sparse_equals_dense_and_sizes():
    rng = np.random.default_rng(0)
    left = [rng.integers(0, 30, rng.integers(0, 4)).tolist() for _ in range(200)]
    right = [rng.integers(0, 12, rng.integers(0, 3)).tolist() for _ in range(200)]
    weights = rng.random(200)
    dense = cooccurrence_graph(left, right, weights, num_left=40, num_right=15)
    sparse = cooccurrence_graph(left, right, weights, num_left=40, num_right=15, sparse=True)
    assert sparse.is_sparse and dense.shape == sparse.shape == (40, 15)
    np.testing.assert_allclose(sparse.to_dense(), dense.to_dense())
    np.testing.assert_array_equal(sparse.best_right_for_left(), dense.best_right_for_left())
    np.testing.assert_allclose(sparse.normalize_rows().to_dense(), dense.normalize_rows().to_dense())
    np.testing.assert_allclose(sparse.normalize_columns().to_dense(), dense.normalize_columns().to_dense())

    # Reference: explicit loops.
    reference = np.zeros((40, 15))
    for ls, rs, w in zip(left, right, weights):
        for a in set(ls):
            for b in set(rs):
                reference[a, b] += w
    np.testing.assert_allclose(dense.to_dense(), reference)


def test_vocabularies_map_arbitrary_ids():
    graph = cooccurrence_graph(
        [["face_b"], ["face_a", "face_b"], []],
        [["Alice"], ["Bob"], ["Alice"]],
        left_vocab=["face_a", "face_b", "face_c"],
        right_vocab=["Alice", "Bob"],
    )
    np.testing.assert_allclose(graph.to_dense(), [[0, 1], [1, 1], [0, 0]])
    best = graph.best_right_for_left()
    assert best.tolist() == [1, 0, -1]  # ties go to the lower index; face_c never co-occurs
    assert [graph.right_vocab[j] if j >= 0 else None for j in best] == ["Bob", "Alice", None]


def test_normalize_rows_and_empty_rows():
    graph = BipartiteGraph(np.array([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]]))
    rows = graph.normalize_rows().to_dense()
    np.testing.assert_allclose(rows, [[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]])
    cols = graph.normalize_columns().to_dense()
    np.testing.assert_allclose(cols, [[1 / 3, 0.6], [0.0, 0.0], [2 / 3, 0.4]])
    # The original is left untouched.
    np.testing.assert_allclose(graph.to_dense()[0], [1.0, 3.0])


def test_best_right_for_left_and_one_to_one():
    weights = np.array([[5.0, 4.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    for graph in (BipartiteGraph(weights), BipartiteGraph(sp.csr_matrix(weights))):
        # Both of the first two rows prefer column 0; the exclusive matching must split them.
        assert graph.best_right_for_left().tolist() == [0, 0, -1, 2]
        assert graph.match_one_to_one() == [(0, 1), (1, 0), (3, 2)]


def test_sparse_ties_pick_lowest_column():
    weights = sp.csr_matrix(np.array([[0.0, 2.0, 1.0, 2.0]]))
    assert BipartiteGraph(weights).best_right_for_left().tolist() == [1]


def test_bipartite_validation():
    with pytest.raises(ValueError, match="2-D"):
        BipartiteGraph(np.ones(3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        BipartiteGraph(np.array([[np.nan]]))
    with pytest.raises(ValueError, match="non-negative"):
        BipartiteGraph(sp.csr_matrix(np.array([[-1.0, 0.0]])))
    with pytest.raises(ValueError, match="left_vocab has 1 entries"):
        BipartiteGraph(np.ones((2, 2)), left_vocab=["a"])
    with pytest.raises(ValueError, match="right_vocab contains duplicate"):
        BipartiteGraph(np.ones((2, 2)), right_vocab=["a", "a"])


def test_cooccurrence_validation():
    with pytest.raises(ValueError, match="same length"):
        cooccurrence_graph([[0]], [[0], [1]])
    with pytest.raises(ValueError, match="one value per group"):
        cooccurrence_graph([[0]], [[0]], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite and non-negative"):
        cooccurrence_graph([[0]], [[0]], weights=[-1.0])
    with pytest.raises(ValueError, match="finite and non-negative"):
        cooccurrence_graph([[0]], [[0]], weights=[np.nan])
    with pytest.raises(ValueError, match="'bob', not in right_vocab"):
        cooccurrence_graph([[0]], [["bob"]], right_vocab=["alice"])
    with pytest.raises(ValueError, match="non-negative integers"):
        cooccurrence_graph([[-1]], [[0]])
    with pytest.raises(ValueError, match="non-negative integers"):
        cooccurrence_graph([["face"]], [[0]])
    with pytest.raises(ValueError, match="num_left=2 is too small"):
        cooccurrence_graph([[3]], [[0]], num_left=2)
    with pytest.raises(ValueError, match="disagrees with len"):
        cooccurrence_graph([["a"]], [[0]], left_vocab=["a"], num_left=3)


def test_count_repeats_makes_groups_multisets():
    left, right = [[0], [0, 1], [1, 1]], [[2, 2, 0], [0], [1]]
    weights = [1.0, 0.5, 2.0]
    graph = cooccurrence_graph(left, right, weights, count_repeats=True)
    reference = np.zeros((2, 3))
    for ls, rs, w in zip(left, right, weights):
        for a in ls:  # every listed occurrence, repeats included
            for b in rs:
                reference[a, b] += w
    np.testing.assert_allclose(graph.to_dense(), reference)
    assert cooccurrence_graph(left, right, weights).to_dense()[0, 2] == 1.0  # a set: once per group


@pytest.mark.parametrize("sparse", [False, True])
def test_merge_left_sums_the_rows_of_each_group(sparse):
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 3, size=(7, 4)).astype(float)
    graph = BipartiteGraph(sp.csr_matrix(weights) if sparse else weights, right_vocab=list("abcd"))
    groups = np.array([2, 0, 2, 1, 0, 2, 2])
    merged = graph.merge_left(groups, num_groups=4)
    expected = np.stack([weights[groups == g].sum(0) for g in range(4)])
    np.testing.assert_array_equal(merged.to_dense(), expected)
    assert merged.is_sparse and merged.right_vocab == tuple("abcd") and not merged.to_dense()[3].any()
    with pytest.raises(ValueError, match=r"groups must lie in \[0, 2\)"):
        graph.merge_left(groups, num_groups=2)
    with pytest.raises(ValueError, match="one integer per left node"):
        graph.merge_left(groups[:3], num_groups=4)
