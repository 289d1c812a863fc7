"""Assignment between two sets: a checked Hungarian solver and weighted bipartite co-occurrence graphs.

A co-occurrence graph links a left vocabulary (e.g. face clusters) to a right vocabulary (e.g. names) by how
often, or how strongly, their items appear together in the same group (a frame, a caption window). Row
normalisation turns counts into ``P(right | left)``, and ``best_right_for_left`` / ``match_one_to_one`` read
off a labelling of the left items.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def hungarian_match(matrix: Any, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one assignment of rows to columns of a cost (or, with ``maximize``, score) matrix.

    Rectangular matrices are fine: ``min(rows, cols)`` pairs are returned as ``(row_ind, col_ind)`` int64
    arrays with ``row_ind`` sorted. NaN or infinite entries raise ``ValueError`` (scipy would either fail
    obscurely or treat them as forbidden edges).
    """
    array = _to_numpy(matrix)
    if array.ndim != 2:
        raise ValueError(f"hungarian_match needs a 2-D matrix, got shape {tuple(array.shape)}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"hungarian_match needs a numeric matrix, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("hungarian_match: matrix contains NaN or infinite entries")
    rows, cols = linear_sum_assignment(array, maximize=maximize)
    return rows.astype(np.int64), cols.astype(np.int64)


def _check_vocab(vocab: Sequence[Hashable] | None, size: int, side: str) -> tuple[Hashable, ...] | None:
    if vocab is None:
        return None
    vocab = tuple(vocab)
    if len(vocab) != size:
        raise ValueError(f"{side}_vocab has {len(vocab)} entries but the graph has {size} {side} nodes")
    if len(set(vocab)) != len(vocab):
        raise ValueError(f"{side}_vocab contains duplicate entries")
    return vocab


class BipartiteGraph:
    """Non-negative weights ``W[l, r]`` between ``num_left`` left nodes and ``num_right`` right nodes.

    ``weights`` is a dense array or a scipy sparse matrix (kept as CSR); ``left_vocab`` / ``right_vocab``
    optionally name the nodes so that indices can be mapped back to ids (``vocab[index]``).
    """

    def __init__(
        self,
        weights: Any,
        left_vocab: Sequence[Hashable] | None = None,
        right_vocab: Sequence[Hashable] | None = None,
    ) -> None:
        if sp.issparse(weights):
            matrix = sp.csr_matrix(weights, dtype=np.float64)
            values = matrix.data
        else:
            matrix = _to_numpy(weights)
            if not (np.issubdtype(matrix.dtype, np.number) or matrix.dtype == np.bool_):
                raise ValueError(f"BipartiteGraph weights must be numeric, got dtype {matrix.dtype}")
            matrix = matrix.astype(np.float64)
            values = matrix
        if matrix.ndim != 2:
            raise ValueError(f"BipartiteGraph weights must be 2-D, got shape {tuple(matrix.shape)}")
        if not np.isfinite(values).all():
            raise ValueError("BipartiteGraph weights contain NaN or infinite entries")
        if (values < 0).any():
            raise ValueError("BipartiteGraph weights must be non-negative")
        self.weights: np.ndarray | sp.csr_matrix = matrix
        self.left_vocab = _check_vocab(left_vocab, matrix.shape[0], "left")
        self.right_vocab = _check_vocab(right_vocab, matrix.shape[1], "right")

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weights.shape[0]), int(self.weights.shape[1])

    @property
    def num_left(self) -> int:
        return self.shape[0]

    @property
    def num_right(self) -> int:
        return self.shape[1]

    @property
    def is_sparse(self) -> bool:
        return sp.issparse(self.weights)

    def to_dense(self) -> np.ndarray:
        return self.weights.toarray() if self.is_sparse else self.weights.copy()

    def row_sums(self) -> np.ndarray:
        return np.asarray(self.weights.sum(axis=1)).ravel()

    def column_sums(self) -> np.ndarray:
        return np.asarray(self.weights.sum(axis=0)).ravel()

    def _scaled(self, row_scale: np.ndarray | None, col_scale: np.ndarray | None) -> BipartiteGraph:
        weights = self.weights
        if self.is_sparse:
            if row_scale is not None:
                weights = sp.diags(row_scale) @ weights
            if col_scale is not None:
                weights = weights @ sp.diags(col_scale)
            weights = sp.csr_matrix(weights)
        else:
            if row_scale is not None:
                weights = weights * row_scale[:, None]
            if col_scale is not None:
                weights = weights * col_scale[None, :]
        return BipartiteGraph(weights, self.left_vocab, self.right_vocab)

    @staticmethod
    def _inverse(sums: np.ndarray) -> np.ndarray:
        # Empty rows or columns stay all-zero instead of becoming NaN.
        return np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)

    def merge_left(self, groups: Sequence[int] | np.ndarray, num_groups: int) -> BipartiteGraph:
        """Sparse graph of ``num_groups`` left nodes whose row ``g`` sums the rows of the left nodes in group ``g``
        (``groups[l]``, an integer in ``[0, num_groups)`` per left node): e.g. faces x names into clusters x names.
        """
        groups = np.asarray(_to_numpy(groups))
        if groups.shape != (self.num_left,) or not np.issubdtype(groups.dtype, np.integer):
            raise ValueError(
                f"groups must hold one integer per left node ({self.num_left}), got {groups.shape}"
            )
        if groups.size and (groups.min() < 0 or groups.max() >= num_groups):
            raise ValueError(f"groups must lie in [0, {num_groups})")
        membership = sp.csr_matrix(
            (np.ones(groups.size), (groups, np.arange(groups.size))), shape=(num_groups, groups.size)
        )
        weights = self.weights if self.is_sparse else sp.csr_matrix(self.weights)
        return BipartiteGraph(sp.csr_matrix(membership @ weights), right_vocab=self.right_vocab)

    def normalize_rows(self) -> BipartiteGraph:
        """New graph whose non-empty rows sum to 1, i.e. ``P(right | left)``."""
        return self._scaled(self._inverse(self.row_sums()), None)

    def normalize_columns(self) -> BipartiteGraph:
        """New graph whose non-empty columns sum to 1, i.e. ``P(left | right)``."""
        return self._scaled(None, self._inverse(self.column_sums()))

    def best_right_for_left(self) -> np.ndarray:
        """Index of the heaviest right node for every left node (lowest index on ties), -1 for empty rows.

        Several left nodes may pick the same right node; see ``match_one_to_one`` for an exclusive labelling.
        """
        best = np.full(self.num_left, -1, dtype=np.int64)
        if self.is_sparse:
            matrix = self.weights
            for row in range(self.num_left):
                start, stop = matrix.indptr[row], matrix.indptr[row + 1]
                data, cols = matrix.data[start:stop], matrix.indices[start:stop]
                positive = data > 0
                if positive.any():
                    top = data[positive].max()
                    best[row] = cols[positive][data[positive] == top].min()
        elif self.num_right > 0:
            has_edge = self.weights.max(axis=1) > 0
            best[has_edge] = self.weights[has_edge].argmax(axis=1)
        return best

    def match_one_to_one(self) -> list[tuple[int, int]]:
        """Pairs ``(left, right)`` of maximum total weight with every node used at most once.

        Pairs with zero weight are dropped, so left nodes without any co-occurring right node stay unmatched.
        The sparse case is densified for the solver.
        """
        dense = self.to_dense()
        rows, cols = hungarian_match(dense, maximize=True)
        return [(int(r), int(c)) for r, c in zip(rows, cols) if dense[r, c] > 0]


def _sized_groups(groups: Iterable[Iterable[Hashable]]) -> tuple[list, np.ndarray]:
    """``groups`` as a list of groups with a length (one-shot iterators become lists), and the lengths."""
    groups = list(groups)
    try:
        lengths = np.fromiter(map(len, groups), dtype=np.int64, count=len(groups))
    except TypeError:
        groups = [list(group) for group in groups]
        lengths = np.fromiter(map(len, groups), dtype=np.int64, count=len(groups))
    return groups, lengths


def _incidence(
    groups: list,
    lengths: np.ndarray,
    lookup: dict[Hashable, int] | None,
    side: str,
    size: int | None,
    count_repeats: bool,
) -> sp.csr_matrix:
    """Groups x items matrix: how often each item is in each group (``count_repeats``), else 1 if it is."""
    items = list(itertools.chain.from_iterable(groups))
    owner = np.repeat(np.arange(len(groups)), lengths)
    if lookup is not None:
        missing = next((n for n, item in enumerate(items) if item not in lookup), None)
        if missing is not None:
            raise ValueError(
                f"{side} group {owner[missing]} contains {items[missing]!r}, not in {side}_vocab"
            )
        ids = np.fromiter((lookup[item] for item in items), dtype=np.int64, count=len(items))
    else:
        ids = np.array(items) if items else np.zeros(0, dtype=np.int64)
        # numpy reads True as 1: bools are looked for separately.
        if ids.dtype.kind not in "iu" or ids.min(initial=0) < 0 or bool in set(map(type, items)):
            bad = next(
                n
                for n, item in enumerate(items)
                if isinstance(item, bool) or not isinstance(item, int | np.integer) or item < 0
            )
            raise ValueError(
                f"{side} group {owner[bad]} contains {items[bad]!r}; without {side}_vocab ids must be "
                "non-negative integers"
            )
        ids = ids.astype(np.int64, copy=False)
    largest = int(ids.max()) if ids.size else -1
    if size is None:
        size = largest + 1
    elif size < largest + 1:
        raise ValueError(f"num_{side}={size} is too small for {side} id {largest}")
    matrix = sp.csr_matrix((np.ones(ids.size), (owner, ids)), shape=(len(groups), size))
    matrix.sum_duplicates()
    if not count_repeats:
        matrix.data[:] = 1.0  # a co-occurrence is a set relation: a repeated id adds no weight
    return matrix


def cooccurrence_graph(
    left_groups: Sequence[Iterable[Hashable]],
    right_groups: Sequence[Iterable[Hashable]],
    weights: Sequence[float] | np.ndarray | None = None,
    *,
    left_vocab: Sequence[Hashable] | None = None,
    right_vocab: Sequence[Hashable] | None = None,
    num_left: int | None = None,
    num_right: int | None = None,
    sparse: bool = False,
    count_repeats: bool = False,
) -> BipartiteGraph:
    """Build ``W[l, r] = sum of the weights of the groups that contain both l and r``.

    Group ``g`` is the pair ``(left_groups[g], right_groups[g])`` of items seen together (e.g. face clusters
    in a frame and names in the matching caption window); ``weights[g]`` (default 1) must be finite and
    non-negative. Each distinct pair counts once per group; with ``count_repeats`` an item listed ``n`` times
    in a group counts ``n`` times (a multiset: ``W[l, r] = sum_g w_g * n_g(l) * n_g(r)``). Items are looked up
    in ``left_vocab`` / ``right_vocab`` when given (any hashable ids); otherwise they must be non-negative
    integers used as indices, and the graph has ``num_left`` / ``num_right`` nodes (default: largest id + 1).
    ``sparse=True`` stores a CSR matrix, for large vocabularies. Built as one sparse product (no loop over
    groups), so it scales to hundreds of thousands of groups.
    """
    (left_groups, left_lengths), (right_groups, right_lengths) = map(
        _sized_groups, (left_groups, right_groups)
    )
    if len(left_groups) != len(right_groups):
        raise ValueError(
            f"left_groups and right_groups must have the same length, got {len(left_groups)} and {len(right_groups)}"
        )
    if weights is None:
        group_weights = np.ones(len(left_groups))
    else:
        group_weights = np.asarray(_to_numpy(weights), dtype=np.float64)
        if group_weights.shape != (len(left_groups),):
            raise ValueError(
                f"weights must hold one value per group ({len(left_groups)}), got shape {group_weights.shape}"
            )
        if not np.isfinite(group_weights).all() or (group_weights < 0).any():
            raise ValueError("weights must be finite and non-negative")

    def size(vocab: Sequence[Hashable] | None, given: int | None, side: str) -> int | None:
        if vocab is not None and given is not None and given != len(vocab):
            raise ValueError(f"num_{side}={given} disagrees with len({side}_vocab)={len(vocab)}")
        return len(vocab) if vocab is not None else given

    def lookup(vocab: Sequence[Hashable] | None) -> dict[Hashable, int] | None:
        return None if vocab is None else {item: i for i, item in enumerate(vocab)}

    left = _incidence(
        left_groups,
        left_lengths,
        lookup(left_vocab),
        "left",
        size(left_vocab, num_left, "left"),
        count_repeats,
    )
    right = _incidence(
        right_groups,
        right_lengths,
        lookup(right_vocab),
        "right",
        size(right_vocab, num_right, "right"),
        count_repeats,
    )
    matrix = sp.csr_matrix(left.T @ sp.diags(group_weights) @ right)
    return BipartiteGraph(matrix if sparse else matrix.toarray(), left_vocab, right_vocab)
