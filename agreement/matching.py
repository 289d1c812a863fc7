"""Assignment between two sets: a checked Hungarian solver and weighted bipartite co-occurrence graphs.

A co-occurrence graph links a left vocabulary (e.g. face clusters) to a right vocabulary (e.g. names) by how
often, or how strongly, their items appear together in the same group (a frame, a caption window). Row
normalisation turns counts into ``P(right | left)``, and ``best_right_for_left`` / ``match_one_to_one`` read
off a labelling of the left items.
"""

from __future__ import annotations

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


def _group_indices(
    group: Iterable[Hashable], lookup: dict[Hashable, int] | None, side: str, position: int
) -> np.ndarray:
    items = list(group)
    if lookup is not None:
        try:
            indices = [lookup[item] for item in items]
        except KeyError as error:
            raise ValueError(
                f"{side} group {position} contains {error.args[0]!r}, not in {side}_vocab"
            ) from None
    else:
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int | np.integer) or item < 0:
                raise ValueError(
                    f"{side} group {position} contains {item!r}; without {side}_vocab ids must be "
                    "non-negative integers"
                )
        indices = [int(item) for item in items]
    # A co-occurrence is a set relation: repeating an id inside one group does not add weight.
    return np.unique(np.asarray(indices, dtype=np.int64))


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
) -> BipartiteGraph:
    """Build ``W[l, r] = sum of the weights of the groups that contain both l and r``.

    Group ``g`` is the pair ``(left_groups[g], right_groups[g])`` of items seen together (e.g. face clusters
    in a frame and names in the matching caption window); ``weights[g]`` (default 1) must be finite and
    non-negative. Each distinct pair counts once per group. Items are looked up in ``left_vocab`` /
    ``right_vocab`` when given (any hashable ids); otherwise they must be non-negative integers used as
    indices, and the graph has ``num_left`` / ``num_right`` nodes (default: largest id + 1). ``sparse=True``
    stores a CSR matrix, for large vocabularies.
    """
    left_groups, right_groups = list(left_groups), list(right_groups)
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

    left_lookup = None if left_vocab is None else {item: i for i, item in enumerate(left_vocab)}
    right_lookup = None if right_vocab is None else {item: i for i, item in enumerate(right_vocab)}
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    max_left = max_right = -1
    for g, (left, right) in enumerate(zip(left_groups, right_groups)):
        li = _group_indices(left, left_lookup, "left", g)
        ri = _group_indices(right, right_lookup, "right", g)
        if li.size:
            max_left = max(max_left, int(li[-1]))
        if ri.size:
            max_right = max(max_right, int(ri[-1]))
        if li.size and ri.size:
            rows.append(np.repeat(li, ri.size))
            cols.append(np.tile(ri, li.size))
            vals.append(np.full(li.size * ri.size, group_weights[g]))

    def _size(vocab: Sequence[Hashable] | None, given: int | None, largest: int, side: str) -> int:
        if vocab is not None:
            if given is not None and given != len(vocab):
                raise ValueError(f"num_{side}={given} disagrees with len({side}_vocab)={len(vocab)}")
            return len(vocab)
        if given is None:
            return largest + 1
        if given < largest + 1:
            raise ValueError(f"num_{side}={given} is too small for {side} id {largest}")
        return given

    shape = (
        _size(left_vocab, num_left, max_left, "left"),
        _size(right_vocab, num_right, max_right, "right"),
    )
    if rows:
        data = (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols)))
        # COO -> CSR sums the repeated (l, r) entries coming from different groups.
        matrix = sp.coo_matrix(data, shape=shape).tocsr()
    else:
        matrix = sp.csr_matrix(shape, dtype=np.float64)
    return BipartiteGraph(matrix if sparse else matrix.toarray(), left_vocab, right_vocab)
