"""k-means for clustering-based self-supervision (DeepCluster-V2) and entity discovery.

Two backends return the same ``(centroids, assignments)``:

- ``"torch"``: Lloyd iterations on any device, with the assignment step chunked so that memory stays bounded.
  Under ``torch.distributed`` each rank holds a shard of the points; the initial centroids are chosen from the
  gathered points on rank 0 and broadcast, and per-cluster sums and counts are all-reduced, so two processes give
  the same result as one.
- ``"faiss"``: ``faiss.Kmeans`` (GPU faiss when it is installed and the data is on a GPU). Under DDP the shards are
  gathered, clustered on rank 0 and the centroids broadcast. What it trades: from the same initial centroids its
  inertia ends about 2% above scikit-learn's and the torch backend's (``scripts/benchmark.py agreement``: N=200,000,
  K=1,000, 10 iterations; faiss handles empty clusters by splitting differently), and on a 2-core CPU it was about
  2x slower than scikit-learn (its bundled OpenBLAS falls back to a generic kernel unless OpenBLAS's core type is
  set). Its use is GPU faiss on large point sets.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from agreement import dist
from agreement.optional import optional_import

Backend = Literal["torch", "faiss"]
Init = Literal["k-means++", "greedy-k-means++", "random"]
Precision = Literal["float32", "bfloat16"]
PRECISIONS = ("float32", "bfloat16")

_BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits


def _validate(x: torch.Tensor, k: int, iterations: int) -> int:
    """Check the input on every rank; returns the number of points over all ranks."""
    if x.ndim != 2:
        raise ValueError(f"kmeans: points must be 2-D (n, dim), got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("kmeans: points have dimension 0")
    if k < 1:
        raise ValueError(f"kmeans: k must be at least 1, got {k}")
    if iterations < 0:
        raise ValueError(f"kmeans: iterations must be non-negative, got {iterations}")
    flags = torch.tensor([x.shape[0], int(not _all_finite(x))], device=x.device, dtype=torch.long)
    dist.all_reduce(flags)
    total, non_finite = int(flags[0]), int(flags[1])
    if total == 0:
        raise ValueError("kmeans: no points to cluster (empty input)")
    if non_finite:
        raise ValueError("kmeans: points contain NaN or inf")
    if k > total:
        raise ValueError(f"kmeans: k={k} is larger than the number of points ({total})")
    return total


def _all_finite(x: torch.Tensor) -> bool:
    # A finite sum proves every entry finite at the cost of one reduction; only an overflowing sum of finite
    # values needs the elementwise check.
    return bool(torch.isfinite(x.sum(dtype=torch.float64))) or bool(torch.isfinite(x).all())


def _prepare(x: torch.Tensor, spherical: bool) -> torch.Tensor:
    x = x.detach().float()
    return torch.nn.functional.normalize(x, dim=1) if spherical else x.contiguous()


def _assignment_error_bound(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n,) bound on how far the bfloat16 assignment score ``||c||^2 - 2 x.c`` of any centroid can be from its
    exact value, per point: two scores closer than twice this may swap, farther apart they cannot.

    With u = 2^-8: rounding x, -2c and ||c||^2 to bfloat16 moves the score by at most (4u + 2u^2) ||x|| ||c|| +
    u ||c||^2 (Cauchy-Schwarz on sum |x_i c_i|), rounding the output by u times its size, at most
    2 ||x|| ||c|| + ||c||^2 to first order, and the fp32 accumulation of dim + 1 products by (dim + 1) 2^-24 of
    the same sum; the coefficients below add these up with room for the second-order terms.
    """
    u = _BF16_UNIT_ROUNDOFF
    accumulation = (x.shape[1] + 1) * 2.0**-24 * 1.01
    c_norm = torch.linalg.vector_norm(centroids.double(), dim=1).max()
    x_norm = torch.linalg.vector_norm(x.double(), dim=1)
    product = 6 * u + 8 * u**2 + 2 * accumulation
    norm = 2 * u + 2 * u**2 + accumulation
    return (product * x_norm * c_norm + norm * c_norm**2).float()


class _LowPrecisionPoints:
    """The points in bfloat16 with a column of ones appended (padded to a multiple of 8 columns), built once per
    k-means run: one bfloat16 GEMM against ``[-2 c, ||c||^2]`` then gives every score, with no pass over the
    (points x centroids) block to add the norms."""

    def __init__(self, x: torch.Tensor) -> None:
        dim = x.shape[1]
        self.width = -(-(dim + 1) // 8) * 8
        self.points = torch.zeros(x.shape[0], self.width, dtype=torch.bfloat16, device=x.device)
        self.points[:, :dim] = x
        self.points[:, dim] = 1.0

    def centroid_columns(self, centroids: torch.Tensor) -> torch.Tensor:
        k, dim = centroids.shape
        columns = torch.zeros(self.width, k, dtype=torch.float32, device=centroids.device)
        columns[:dim] = -2.0 * centroids.T
        columns[dim] = (centroids * centroids).sum(1)
        return columns.to(torch.bfloat16)


# A float32 copy of a bfloat16 score has 16 zero low bits; _PackedMin stores the column index there.
_PACKED_INDEX_BITS = 16


class _PackedMin:
    """Row-wise minimum and its column of bfloat16 scores, through a float32 block whose 16 low bits (zero in a
    widened bfloat16) hold the column index.

    ``min(dim=1)`` with indices runs a scalar loop over bfloat16 and cost about 4x the GEMM that produced the
    scores; widening, writing the indices and a vectorised ``amin`` cost about half as much. The packed bits stay
    below one bfloat16 step, so distinct scores keep their order and the minimum's bfloat16 value is recovered
    exactly; only equal scores are ordered by index (lowest first for positive, highest for negative scores).
    """

    def __init__(self, rows: int, k: int, device: torch.device) -> None:
        self.wide = torch.empty(rows, k, dtype=torch.float32, device=device)
        self.columns = torch.arange(k, dtype=torch.int32, device=device)

    def __call__(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wide = self.wide[: scores.shape[0]]
        wide.copy_(scores)
        wide.view(torch.int32).bitwise_or_(self.columns)
        key = wide.amin(dim=1).view(torch.int32)
        low_mask = (1 << _PACKED_INDEX_BITS) - 1
        return key.bitwise_and(~low_mask).view(torch.float32), key.bitwise_and(low_mask).long()


def _nearest(
    x: torch.Tensor,
    centroids: torch.Tensor,
    spherical: bool,
    chunk_size: int,
    point_sq: torch.Tensor | None = None,
    low: _LowPrecisionPoints | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid and the squared Euclidean distance to it, chunked over points.

    ``point_sq`` (n,) are the points' squared norms when the caller has them (computed per chunk otherwise).
    With ``low`` (the points in bfloat16), the scores come from one bfloat16 GEMM: the same index wherever the best
    score leads the second by more than twice ``_assignment_error_bound``, the distance to bfloat16 accuracy.
    """
    assignments = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    distances = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if low is None:
        # ||x||^2 is constant per row, so the argmin only needs ||c||^2 - 2 x.c. Scaling by -2 is exact, and a
        # product written into one reused block and then shifted in place is faster than addmm, which first
        # copies the broadcast ||c||^2 into every fresh output block.
        centroid_sq = (centroids * centroids).sum(1)
        points, columns = x, (-2.0 * centroids).T.contiguous()
    else:
        points, columns = low.points, low.centroid_columns(centroids)
    rows, k = min(chunk_size, x.shape[0]), centroids.shape[0]
    block = torch.empty(rows, k, dtype=points.dtype, device=x.device)
    packed_min = _PackedMin(rows, k, x.device) if low is not None and k <= 1 << _PACKED_INDEX_BITS else None
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start : start + chunk_size]
        scores = torch.mm(points[start : start + chunk_size], columns, out=block[: chunk.shape[0]])
        if packed_min is not None:
            best, index = packed_min(scores)
        else:
            best, index = (scores if low is not None else scores.add_(centroid_sq)).min(dim=1)
        assignments[start : start + chunk_size] = index
        if spherical:
            chunk_sq: torch.Tensor | float = 1.0
        elif point_sq is not None:
            chunk_sq = point_sq[start : start + chunk_size]
        else:
            chunk_sq = (chunk * chunk).sum(1)
        distances[start : start + chunk_size] = (best.float() + chunk_sq).clamp_min_(0)
    return assignments, distances


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator, chunk_size: int) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) on one process."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator).item()
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x[first]
    closest = _squared_distance_to(x, centroids[:1], chunk_size)
    for i in range(1, k):
        total = closest.sum()
        # With fewer distinct points than k every distance is 0: fall back to uniform sampling.
        probabilities = closest / total if total > 0 else torch.ones_like(closest)
        choice = torch.multinomial(probabilities.cpu(), 1, generator=generator).item()
        centroids[i] = x[choice]
        torch.minimum(closest, _squared_distance_to(x, centroids[i : i + 1], chunk_size), out=closest)
    return centroids


def _squared_distance_to(x: torch.Tensor, centroids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    return _nearest(x, centroids, spherical=False, chunk_size=chunk_size)[1]


def _greedy_kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """scikit-learn's greedy k-means++ seeding on one process: at each step, ``2 + log k`` candidates are drawn by
    D^2 sampling and the one that lowers the potential (the summed squared distances) most is kept.

    Plain D^2 sampling draws one candidate per step; on skewed cluster sizes it often seeds two centroids in one
    large group and none in a small one, which Lloyd iterations rarely undo.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    point_sq = (x * x).sum(1)

    def squared_distances(index: torch.Tensor) -> torch.Tensor:
        # (len(index), n) in float64: the potentials sum n terms and pick the smallest.
        chosen = x[index]
        return (point_sq[index, None] - 2 * chosen @ x.T + point_sq[None]).clamp_min_(0).double()

    first = torch.randint(n, (1,), generator=generator).to(x.device)
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x[first[0]]
    closest = squared_distances(first)[0]
    for i in range(1, k):
        cumulative = torch.cumsum(closest, 0)
        total = cumulative[-1]
        if total > 0:
            draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * total
            candidates = torch.searchsorted(cumulative, draws).clamp_(max=n - 1)
        else:  # fewer distinct points than k: every distance is 0
            candidates = torch.randint(n, (trials,), generator=generator).to(x.device)
        potentials = torch.minimum(closest[None], squared_distances(candidates))
        best = int(potentials.sum(1).argmin())
        centroids[i] = x[candidates[best]]
        closest = potentials[best]
    return centroids


def _initial_centroids(
    x: torch.Tensor, k: int, init: Init, seed: int, spherical: bool, chunk_size: int
) -> torch.Tensor:
    """Choose the initial centroids from all ranks' points on rank 0 and broadcast them."""
    gathered = dist.all_gather(x)
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    if dist.get_rank() == 0:
        generator = torch.Generator().manual_seed(seed)
        if init == "random":
            centroids = gathered[
                torch.randperm(gathered.shape[0], generator=generator)[:k].to(x.device)
            ].clone()
        elif init == "k-means++":
            centroids = _kmeans_plus_plus(gathered, k, generator, chunk_size)
        elif init == "greedy-k-means++":
            centroids = _greedy_kmeans_plus_plus(gathered, k, generator)
        else:
            raise ValueError(
                f"kmeans: init must be 'k-means++', 'greedy-k-means++', 'random' or a tensor, got {init!r}"
            )
    dist.broadcast(centroids, src=0)
    if spherical:
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    return centroids


def _repair_empty_clusters(
    x: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor, distances: torch.Tensor
) -> torch.Tensor:
    """Move each empty cluster onto one of the points farthest from their centroid (globally, ties by rank order)."""
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel() == 0:
        return centroids
    take = min(empty.numel(), x.shape[0])
    local_far = torch.topk(distances, take).indices if take > 0 else distances.new_zeros(0, dtype=torch.long)
    candidates = dist.all_gather(x[local_far])
    candidate_distances = dist.all_gather(distances[local_far])
    order = torch.sort(candidate_distances, descending=True, stable=True).indices[: empty.numel()]
    centroids = centroids.clone()
    centroids[empty[: order.numel()]] = candidates[order]
    return centroids


def _mean_variance(x: torch.Tensor, point_sq: torch.Tensor) -> float:
    """Mean over dimensions of the points' variance, over all ranks (the scale of scikit-learn's ``tol``).

    Equal to ``(mean ||x||^2 - ||mean x||^2) / dim``, which reuses the points' squared norms instead of a slow
    column-wise reduction of squares.
    """
    column_sums = x.sum(0).double()
    totals = torch.stack([point_sq.sum().double(), x.new_tensor(x.shape[0], dtype=torch.float64)])
    dist.all_reduce(column_sums)
    dist.all_reduce(totals)
    mean = column_sums / totals[1]
    return float((totals[0] / totals[1] - (mean**2).sum()).clamp_min(0) / x.shape[1])


def _kmeans_torch(
    x: torch.Tensor,
    centroids: torch.Tensor,
    iterations: int,
    spherical: bool,
    chunk_size: int,
    tol: float = 0.0,
    precision: Precision = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    k = centroids.shape[0]
    # Unit points need no norms for the assignment, only for the tolerance's scale.
    point_sq = torch.linalg.vector_norm(x, dim=1) ** 2 if not spherical or tol > 0 else None
    threshold = tol * _mean_variance(x, point_sq) if tol > 0 else 0.0
    low = _LowPrecisionPoints(x) if precision == "bfloat16" else None

    def nearest(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _nearest(x, centroids, spherical, chunk_size, point_sq, low)

    previous: torch.Tensor | None = None
    for _ in range(iterations):
        assignments, distances = nearest(centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)
        changed = x.shape[0] if previous is None else int(assignments.ne(previous).sum())
        stats = torch.bincount(assignments, minlength=k)
        stats = torch.cat([stats, stats.new_tensor([changed])])
        dist.all_reduce(sums)
        dist.all_reduce(stats)
        counts = stats[:k].to(x.dtype)
        if int(stats[k]) == 0 and bool((counts > 0).all()):
            # Same assignments as the previous pass: the centroids are already their means, a fixed point.
            return centroids, assignments
        updated = sums / counts.clamp_min(1).unsqueeze(1)
        updated[counts == 0] = centroids[counts == 0]
        if spherical:
            updated = torch.nn.functional.normalize(updated, dim=1)
        updated = _repair_empty_clusters(x, updated, counts, distances)
        converged = tol > 0 and float(((updated - centroids) ** 2).sum()) <= threshold
        centroids, previous = updated, assignments
        if converged:
            break
    assignments, _ = nearest(centroids)
    return centroids, assignments


def _subsample(x: torch.Tensor, sample_size: int, seed: int) -> torch.Tensor:
    """About ``sample_size`` random points over all ranks, each rank drawing in proportion to its shard."""
    sizes = dist.all_gather(torch.tensor([x.shape[0]], device=x.device))
    total = int(sizes.sum())
    take = min(x.shape[0], round(sample_size * x.shape[0] / total))
    generator = torch.Generator().manual_seed(seed + 7919 * dist.get_rank())
    return x[torch.randperm(x.shape[0], generator=generator)[:take].to(x.device)]


def _kmeans_faiss(
    x: torch.Tensor, centroids: torch.Tensor, iterations: int, spherical: bool, seed: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    faiss = optional_import("faiss", purpose="the faiss k-means backend")
    gathered = dist.all_gather(x)
    k, dim = centroids.shape
    result = torch.empty_like(centroids)
    if dist.get_rank() == 0:
        use_gpu = x.is_cuda and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        points = gathered.cpu().numpy()
        kmeans = faiss.Kmeans(
            dim,
            k,
            niter=iterations,
            spherical=spherical,
            seed=seed,
            gpu=use_gpu,
            min_points_per_centroid=1,
            max_points_per_centroid=max(1, points.shape[0]),
            update_index=True,
        )
        if iterations > 0:
            kmeans.train(points, init_centroids=centroids.cpu().numpy())
            result = torch.from_numpy(kmeans.centroids).to(x.device)
        else:
            result = centroids
    dist.broadcast(result, src=0)
    assignments, _ = _nearest(x, result, spherical, chunk_size)
    return result, assignments


def kmeans(
    x: torch.Tensor,
    k: int,
    iterations: int = 10,
    spherical: bool = True,
    init: Init | torch.Tensor = "k-means++",
    seed: int = 0,
    backend: Backend = "torch",
    chunk_size: int = 8192,
    tol: float = 0.0,
    sample_size: int | None = None,
    sample_iterations: int | None = None,
    n_init: int = 1,
    precision: Precision = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``x`` into ``k`` groups.

    Args:
        x: (n, dim) points; under DDP, this rank's shard.
        k: number of clusters.
        iterations: Lloyd iterations over all points (10 in DeepCluster-V2).
        spherical: cosine k-means: points and centroids are L2-normalised, as DeepCluster-V2 does.
        init: ``"k-means++"`` (one D^2-sampled candidate per centroid), ``"greedy-k-means++"`` (scikit-learn's
            seeding: the best of ``2 + log k`` candidates per centroid), ``"random"`` (k distinct random points) or
            a (k, dim) tensor of initial centroids.
        seed: seeds the initialisation; the result is deterministic for a given seed.
        backend: ``"torch"`` or ``"faiss"``.
        chunk_size: points per block in the assignment step (bounds memory at ``chunk_size * k`` floats).
        tol: (torch backend) stop once the summed squared centroid shift of an iteration is at most ``tol`` times
            the points' mean per-dimension variance (scikit-learn's rule); 0 runs all ``iterations``. Either way
            the loop stops when no assignment changes, which cannot alter the result.
        sample_size: first fit on a random subsample of about this many points (seeding included), then run
            ``iterations`` Lloyd iterations on all points from those centroids. ``None`` uses all points.
        sample_iterations: Lloyd iterations on the subsample (default ``iterations``); cheap, so they can run
            to ``tol`` while a few full passes polish the result.
        n_init: starts (seeded with ``seed``, ``seed + 1``, ...); the one with the lowest inertia is kept, as
            scikit-learn's ``n_init``. With ``sample_size``, every start is fitted on the same subsample, compared
            there, and only the best is refined on all points.
        precision: (torch backend) ``"bfloat16"`` computes the assignment scores with one bfloat16 GEMM (fp32
            accumulation) instead of fp32; the centroid update stays fp32. A point gets the fp32 assignment
            whenever its best centroid leads the second by more than twice ``_assignment_error_bound`` (about
            2.4% of ``||x|| max ||c||`` plus 0.8% of ``max ||c||^2``); nearer ties may go either way. Faster where the hardware has bfloat16
            matrix instructions (recent x86 and GPUs), slower where bfloat16 is emulated.

    Returns:
        centroids (k, dim) float32 and this rank's assignments (n,) int64.
    """
    total = _validate(x, k, iterations)
    if chunk_size < 1:
        raise ValueError(f"kmeans: chunk_size must be positive, got {chunk_size}")
    if tol < 0:
        raise ValueError(f"kmeans: tol must be non-negative, got {tol}")
    if backend not in ("torch", "faiss"):
        raise ValueError(f"kmeans: backend must be 'torch' or 'faiss', got {backend!r}")
    if sample_size is not None and sample_size < k:
        raise ValueError(f"kmeans: sample_size={sample_size} must be at least k={k}")
    if sample_iterations is not None and sample_iterations < 0:
        raise ValueError(f"kmeans: sample_iterations must be non-negative, got {sample_iterations}")
    if n_init < 1:
        raise ValueError(f"kmeans: n_init must be at least 1, got {n_init}")
    if precision not in PRECISIONS:
        raise ValueError(f"kmeans: precision must be one of {PRECISIONS}, got {precision!r}")
    points = _prepare(x, spherical)
    if isinstance(init, torch.Tensor):
        if init.shape != (k, x.shape[1]):
            raise ValueError(
                f"kmeans: initial centroids must have shape {(k, x.shape[1])}, got {tuple(init.shape)}"
            )
        if n_init > 1:
            raise ValueError(
                f"kmeans: n_init={n_init} starts need a seeding rule, not fixed initial centroids"
            )
        centroids = _prepare(init.to(points.device), spherical)
    sampled = sample_size is not None and sample_size < total
    fit_points = _subsample(points, sample_size, seed) if sampled else points
    fit_iterations = iterations if sample_iterations is None or not sampled else sample_iterations
    best: tuple[float, tuple[torch.Tensor, torch.Tensor]] | None = None
    for start in range(n_init):
        start_seed = seed + start
        if not isinstance(init, torch.Tensor):
            centroids = _initial_centroids(fit_points, k, init, start_seed, spherical, chunk_size)
        fitted = _run_backend(
            fit_points, centroids, fit_iterations, spherical, start_seed, chunk_size, tol, backend, precision
        )
        score = inertia(fit_points, *fitted) if n_init > 1 else 0.0
        if best is None or score < best[0]:
            best = (score, fitted)
    assert best is not None
    if not sampled:
        return best[1]
    return _run_backend(points, best[1][0], iterations, spherical, seed, chunk_size, tol, backend, precision)


def _run_backend(
    x: torch.Tensor,
    centroids: torch.Tensor,
    iterations: int,
    spherical: bool,
    seed: int,
    chunk_size: int,
    tol: float,
    backend: Backend,
    precision: Precision = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "torch":
        return _kmeans_torch(x, centroids, iterations, spherical, chunk_size, tol, precision)
    return _kmeans_faiss(x, centroids, iterations, spherical, seed, chunk_size)


def inertia(x: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor) -> float:
    """Sum of squared Euclidean distances of points to their assigned centroid (summed over ranks)."""
    total = ((x.float() - centroids[assignments]) ** 2).sum().reshape(1)
    return float(dist.all_reduce(total).item())
