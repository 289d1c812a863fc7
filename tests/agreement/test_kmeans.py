import importlib

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from agreement.kmeans import _initial_centroids, inertia, kmeans
from tests.helpers.distributed import run_distributed

# The package re-exports the function under the module's name.
kmeans_module = importlib.import_module("agreement.kmeans")


def blobs(n=3000, dim=16, centers=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, dim, generator=generator) * 4
    labels = torch.randint(centers, (n,), generator=generator)
    return means[labels] + torch.randn(n, dim, generator=generator), labels


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_inertia_within_one_percent_of_scikit_learn_with_same_init(backend):
    x, _ = blobs()
    init = _initial_centroids(x, 12, "k-means++", 3, spherical=False, chunk_size=1024)
    reference = KMeans(12, init=init.numpy(), n_init=1, max_iter=10, algorithm="lloyd", tol=0).fit(x.numpy())
    centroids, assignments = kmeans(x, 12, iterations=10, spherical=False, init=init, backend=backend)
    assert inertia(x, centroids, assignments) <= 1.01 * reference.inertia_


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_random_data_inertia_matches_scikit_learn(backend):
    x = torch.randn(5000, 8)
    init = _initial_centroids(x, 50, "random", 0, spherical=False, chunk_size=1024)
    reference = KMeans(50, init=init.numpy(), n_init=1, max_iter=10, algorithm="lloyd", tol=0).fit(x.numpy())
    centroids, assignments = kmeans(x, 50, iterations=10, spherical=False, init=init, backend=backend)
    assert abs(inertia(x, centroids, assignments) / reference.inertia_ - 1) < 0.01


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_recovers_well_separated_blobs(backend):
    from sklearn.metrics import adjusted_rand_score

    x, labels = blobs(centers=5, dim=8)
    _, assignments = kmeans(x, 5, iterations=20, spherical=False, backend=backend, seed=1)
    assert adjusted_rand_score(labels.numpy(), assignments.numpy()) > 0.95


def test_spherical_centroids_are_unit_norm_and_assignments_are_by_cosine():
    x, _ = blobs(dim=12)
    centroids, assignments = kmeans(x, 6, iterations=5, spherical=True)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(6))
    cosine = torch.nn.functional.normalize(x, dim=1) @ centroids.T
    assert torch.equal(assignments, cosine.argmax(1))


def test_deterministic_under_a_seed_and_seed_matters():
    x, _ = blobs()
    first = kmeans(x, 8, seed=5)
    second = kmeans(x, 8, seed=5)
    other = kmeans(x, 8, seed=6)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_chunking_does_not_change_the_result():
    x, _ = blobs(n=1000)
    whole = kmeans(x, 7, chunk_size=10_000, spherical=False)
    chunked = kmeans(x, 7, chunk_size=33, spherical=False)
    torch.testing.assert_close(whole[0], chunked[0])
    assert torch.equal(whole[1], chunked[1])


def test_assignment_step_is_the_float64_nearest_centroid_and_distance():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 24, generator=generator) * 3
    centroids = torch.randn(50, 24, generator=generator) * 3
    exact = torch.cdist(x.double(), centroids.double()) ** 2
    best, expected = exact.topk(2, dim=1, largest=False)
    # Points whose two nearest centroids are farther apart than float32 can blur.
    clear = (best[:, 1] - best[:, 0]) > 1e-3 * best[:, 1]
    assert clear.float().mean() > 0.95
    for spherical, chunk_size in ((False, 7), (False, 4096)):
        index, distance = kmeans_module._nearest(x, centroids, spherical, chunk_size)
        assert torch.equal(index[clear], expected[clear, 0])
        torch.testing.assert_close(distance.double(), best[:, 0], rtol=1e-4, atol=1e-3)


def _exact_scores(x, centroids):
    x, centroids = x.double(), centroids.double()
    return (centroids * centroids).sum(1) - 2 * x @ centroids.T


@pytest.mark.parametrize(
    ("scale", "offset", "dim"), [(1.0, 0.0, 24), (3.0, 5.0, 24), (0.01, 0.0, 130), (1.0, 40.0, 7)]
)
def test_bfloat16_scores_stay_within_the_error_bound(scale, offset, dim):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2000, dim, generator=generator) * scale + offset
    centroids = torch.randn(60, dim, generator=generator) * scale + offset
    low = kmeans_module._LowPrecisionPoints(x)
    computed = (low.points @ low.centroid_columns(centroids)).double()
    error = (computed - _exact_scores(x, centroids)).abs().max(dim=1).values
    bound = kmeans_module._assignment_error_bound(x, centroids).double()
    assert bool((error <= bound).all())
    assert float((error / bound).max()) > 0.05  # the bound is not vacuously loose


@pytest.mark.parametrize("spherical", [False, True])
def test_bfloat16_assignment_is_the_exact_one_outside_the_error_bound(spherical):
    generator = torch.Generator().manual_seed(3)
    x, _ = blobs(n=4000, dim=32, centers=40, seed=5)
    centroids = x[torch.randperm(len(x), generator=generator)[:40]]
    if spherical:
        x, centroids = (torch.nn.functional.normalize(t, dim=1) for t in (x, centroids))
    scores = _exact_scores(x, centroids)
    best, expected = scores.topk(2, dim=1, largest=False)
    clear = (best[:, 1] - best[:, 0]) > 2 * kmeans_module._assignment_error_bound(x, centroids).double()
    assert clear.float().mean() > 0.5  # most points are covered by the guarantee
    low = kmeans_module._LowPrecisionPoints(x)
    for chunk_size in (7, 4096):
        index, distance = kmeans_module._nearest(x, centroids, spherical, chunk_size, low=low)
        assert torch.equal(index[clear], expected[clear, 0])
        exact_distance = ((x.double() - centroids.double()[index]) ** 2).sum(1)
        bound = kmeans_module._assignment_error_bound(x, centroids).double()
        assert bool(((distance.double() - exact_distance).abs() <= bound + 1e-4).all())


@pytest.mark.parametrize("span", [3, 1000])
def test_packed_minimum_is_the_bfloat16_minimum(span):
    # span 3: integer scores with many ties, of both signs; span 1000: mostly distinct scores
    generator = torch.Generator().manual_seed(8)
    scores = (torch.randint(-span, span + 1, (500, 300), generator=generator) * 0.37).to(torch.bfloat16)
    best, index = kmeans_module._PackedMin(500, 300, scores.device)(scores)
    expected = scores.float().min(dim=1).values
    assert torch.equal(best, expected)
    assert torch.equal(scores.float().gather(1, index[:, None])[:, 0], expected)  # a column that holds it
    if span == 1000:
        distinct = (scores.float() == expected[:, None]).sum(1) == 1
        assert torch.equal(index[distinct], scores.float().min(dim=1).indices[distinct])


def test_bfloat16_assignment_without_packing_is_the_same(monkeypatch):
    x, _ = blobs(n=3000, dim=16, centers=30, seed=9)
    centroids = x[:30].clone()
    low = kmeans_module._LowPrecisionPoints(x)
    packed = kmeans_module._nearest(x, centroids, False, 512, low=low)
    monkeypatch.setattr(kmeans_module, "_PACKED_INDEX_BITS", 4)  # 30 clusters need 5 bits: falls back to min
    plain = kmeans_module._nearest(x, centroids, False, 512, low=low)
    assert torch.equal(packed[1], plain[1])
    scores = (low.points @ low.centroid_columns(centroids)).float()
    distinct = (scores == scores.min(dim=1, keepdim=True).values).sum(1) == 1
    assert torch.equal(packed[0][distinct], plain[0][distinct])


def test_bfloat16_kmeans_inertia_within_one_percent_of_float32():
    x, _ = blobs(n=6000, dim=32, centers=50, seed=6)
    init = _initial_centroids(x, 50, "random", 0, spherical=False, chunk_size=1024)
    runs = {
        precision: kmeans(x, 50, iterations=10, spherical=False, init=init, precision=precision)
        for precision in ("float32", "bfloat16")
    }
    # near ties may send the two runs to different local optima; bfloat16 must not end worse by over 1%
    assert inertia(x, *runs["bfloat16"]) <= 1.01 * inertia(x, *runs["float32"])
    with pytest.raises(ValueError, match="precision must be one of"):
        kmeans(x, 5, precision="float16")


def test_empty_clusters_are_repaired():
    x = torch.cat([torch.randn(100, 2) * 0.1, torch.randn(100, 2) * 0.1 + 10])
    init = torch.tensor([[0.0, 0.0], [10.0, 10.0], [1000.0, 1000.0], [-1000.0, 5.0]])  # two start empty
    centroids, assignments = kmeans(x, 4, iterations=5, spherical=False, init=init)
    counts = torch.bincount(assignments, minlength=4)
    assert (counts > 0).all()
    assert centroids.abs().max() < 20


def test_single_cluster_is_the_mean():
    x = torch.randn(50, 3)
    centroids, assignments = kmeans(x, 1, iterations=2, spherical=False)
    torch.testing.assert_close(centroids[0], x.mean(0))
    assert (assignments == 0).all()


def _count_assignment_passes(monkeypatch):
    calls = []
    original = kmeans_module._nearest

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(kmeans_module, "_nearest", counting)
    return calls


def test_stops_when_assignments_stop_changing_with_the_same_result(monkeypatch):
    x, _ = blobs(centers=5, dim=8)
    init = _initial_centroids(x, 5, "k-means++", 0, spherical=False, chunk_size=1024)
    calls = _count_assignment_passes(monkeypatch)
    centroids, assignments = kmeans(x, 5, iterations=200, spherical=False, init=init)
    assert len(calls) < 50
    reference = KMeans(5, init=init.numpy(), n_init=1, max_iter=300, algorithm="lloyd", tol=0).fit(x.numpy())
    np.testing.assert_allclose(centroids.numpy(), reference.cluster_centers_, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(assignments.numpy(), reference.labels_)


def test_tol_follows_scikit_learn_rule(monkeypatch):
    x = torch.randn(4000, 6, generator=torch.Generator().manual_seed(0))
    init = _initial_centroids(x, 20, "random", 0, spherical=False, chunk_size=1024)
    calls = _count_assignment_passes(monkeypatch)
    centroids, assignments = kmeans(x, 20, iterations=300, spherical=False, init=init, tol=1e-3)
    reference = KMeans(20, init=init.numpy(), n_init=1, max_iter=300, algorithm="lloyd", tol=1e-3).fit(
        x.numpy()
    )
    # Iterations made plus the final assignment; scikit-learn checks the same shift against the same scale.
    assert abs((len(calls) - 1) - reference.n_iter_) <= 1
    assert abs(inertia(x, centroids, assignments) / reference.inertia_ - 1) < 0.005
    with pytest.raises(ValueError, match="tol"):
        kmeans(x, 3, tol=-1.0)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_subsample_fit_then_full_passes_matches_full_fit(monkeypatch, backend):
    x, _ = blobs(n=20000, dim=16, centers=12, seed=3)
    init = _initial_centroids(x, 12, "k-means++", 3, spherical=False, chunk_size=1024)
    options = dict(iterations=30, spherical=False, init=init, backend=backend, tol=1e-4)
    full = kmeans(x, 12, **options)
    calls = _count_assignment_passes(monkeypatch)
    sampled = kmeans(x, 12, sample_size=2000, **options)
    assert calls and min(calls) < 3000  # the first iterations ran on the subsample
    assert abs(inertia(x, *sampled) / inertia(x, *full) - 1) < 0.01
    seeded = kmeans(x, 12, iterations=30, spherical=False, seed=1, backend=backend, sample_size=2000)
    again = kmeans(x, 12, iterations=30, spherical=False, seed=1, backend=backend, sample_size=2000)
    assert torch.equal(seeded[1], again[1])
    with pytest.raises(ValueError, match="sample_size"):
        kmeans(x, 12, sample_size=5)


@pytest.mark.parametrize(
    ("x", "k", "message"),
    [
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 1, "NaN or inf"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), 1, "NaN or inf"),
        (torch.randn(3, 2), 4, "larger than the number of points"),
        (torch.zeros(0, 4), 1, "empty"),
        (torch.randn(5), 2, "2-D"),
        (torch.randn(5, 2), 0, "at least 1"),
    ],
)
def test_bad_input_raises(x, k, message):
    with pytest.raises(ValueError, match=message):
        kmeans(x, k)


def test_bad_initial_centroids_shape_raises():
    with pytest.raises(ValueError, match="initial centroids must have shape"):
        kmeans(torch.randn(10, 3), 2, init=torch.randn(3, 3))


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        kmeans(torch.randn(10, 3), 2, backend="sklearn")


def _kmeans_on_shard(rank, world_size, x, backend, spherical, precision="float32"):
    shard = x.chunk(world_size)[rank]
    return kmeans(shard, 6, iterations=8, spherical=spherical, seed=2, backend=backend, precision=precision)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("backend", "spherical", "precision"),
    [
        ("torch", True, "float32"),
        ("torch", False, "float32"),
        ("faiss", False, "float32"),
        ("torch", True, "bfloat16"),
    ],
)
def test_two_processes_equal_one(backend, spherical, precision):
    x, _ = blobs(n=600, dim=8)
    expected_centroids, expected_assignments = kmeans(
        x, 6, iterations=8, spherical=spherical, seed=2, backend=backend, precision=precision
    )
    results = run_distributed(_kmeans_on_shard, 2, x, backend, spherical, precision)
    for centroids, _ in results:
        torch.testing.assert_close(centroids, expected_centroids, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([a for _, a in results]), expected_assignments)


def _kmeans_with_empty_cluster(rank, world_size, x, init):
    return kmeans(x.chunk(world_size)[rank], 4, iterations=3, spherical=False, init=init)


@pytest.mark.distributed
def test_empty_cluster_repair_is_the_same_on_two_processes():
    x = torch.cat([torch.randn(40, 2) * 0.1, torch.randn(40, 2) * 0.1 + 10])
    init = torch.tensor([[0.0, 0.0], [10.0, 10.0], [1000.0, 1000.0], [-1000.0, 5.0]])
    expected = kmeans(x, 4, iterations=3, spherical=False, init=init)
    results = run_distributed(_kmeans_with_empty_cluster, 2, x, init)
    for centroids, _ in results:
        torch.testing.assert_close(centroids, expected[0])
    np.testing.assert_array_equal(torch.cat([a for _, a in results]).numpy(), expected[1].numpy())


def _sampled_kmeans_on_shard(rank, world_size, x, init):
    return kmeans(
        x.chunk(world_size)[rank], 5, iterations=20, spherical=False, init=init, tol=1e-4, sample_size=500
    )


@pytest.mark.distributed
def test_subsample_fit_on_two_processes_agrees_across_ranks_and_with_one():
    x, _ = blobs(n=4000, dim=8, centers=5)
    init = _initial_centroids(x, 5, "k-means++", 0, spherical=False, chunk_size=1024)
    single = kmeans(x, 5, iterations=20, spherical=False, init=init, tol=1e-4, sample_size=500)
    results = run_distributed(_sampled_kmeans_on_shard, 2, x, init)
    torch.testing.assert_close(results[0][0], results[1][0])
    assignments = torch.cat([a for _, a in results])
    assert abs(inertia(x, results[0][0], assignments) / inertia(x, *single) - 1) < 0.01


def _potential(x, centroids):
    return float(torch.cdist(x.double(), centroids.double()).min(1).values.pow(2).sum())


def test_greedy_seeding_potential_matches_scikit_learn():
    # Skewed blob sizes are where the greedy rule matters; compare the seeding potential over many seeds.
    from sklearn.cluster import kmeans_plusplus

    generator = torch.Generator().manual_seed(0)
    means = torch.randn(20, 8, generator=generator) * 3
    sizes = torch.logspace(1, 3, 20).long()
    x = torch.cat(
        [m + torch.randn(int(s), 8, generator=generator) for m, s in zip(means, sizes, strict=True)]
    )
    ours = [_potential(x, _initial_centroids(x, 20, "greedy-k-means++", s, False, 1024)) for s in range(30)]
    plain = [_potential(x, _initial_centroids(x, 20, "k-means++", s, False, 1024)) for s in range(30)]
    reference = [
        _potential(x, torch.from_numpy(kmeans_plusplus(x.numpy(), 20, random_state=s)[0])) for s in range(30)
    ]
    assert abs(np.mean(ours) / np.mean(reference) - 1) < 0.1
    assert abs(np.median(ours) / np.median(reference) - 1) < 0.1
    assert np.mean(ours) < np.mean(plain)


def test_greedy_seeding_picks_distinct_data_points():
    x, _ = blobs(n=500, centers=6)
    centroids = _initial_centroids(x, 30, "greedy-k-means++", 0, spherical=False, chunk_size=64)
    matches = (centroids[:, None] == x[None]).all(-1).nonzero()
    assert len(torch.unique(matches[:, 0])) == 30 and len(torch.unique(matches[:, 1])) == 30
    duplicates = torch.zeros(5, 2)  # fewer distinct points than k: no division by a zero potential
    assert torch.isfinite(_initial_centroids(duplicates, 3, "greedy-k-means++", 0, False, 8)).all()


@pytest.mark.parametrize("sample_size", [None, 1500])
def test_n_init_keeps_the_start_with_the_lowest_inertia(sample_size):
    x, _ = blobs(n=3000, dim=8, centers=40, seed=4)
    options = dict(iterations=30, spherical=False, init="greedy-k-means++", tol=1e-4, sample_size=sample_size)
    singles = [inertia(x, *kmeans(x, 25, seed=s, **options)) for s in range(5)]
    best = inertia(x, *kmeans(x, 25, seed=0, n_init=5, **options))
    if sample_size is None:
        assert best == pytest.approx(min(singles), rel=1e-6)
    assert best <= singles[0] * (1 + 1e-6)
    # scikit-learn with the same number of starts lands at about the same objective.
    reference = KMeans(25, n_init=5, random_state=0, tol=1e-4, max_iter=30).fit(x.numpy()).inertia_
    assert best <= 1.02 * reference


def test_n_init_defaults_to_one_start_and_rejects_fixed_centroids():
    x, _ = blobs(n=400)
    assert torch.equal(kmeans(x, 5, seed=3)[1], kmeans(x, 5, seed=3, n_init=1)[1])
    with pytest.raises(ValueError, match="n_init"):
        kmeans(x, 5, n_init=0)
    with pytest.raises(ValueError, match="n_init=2 starts need a seeding rule"):
        kmeans(x, 2, init=x[:2], n_init=2)


def _restarted_kmeans_on_shard(rank, world_size, x):
    return kmeans(
        x.chunk(world_size)[rank], 6, iterations=8, spherical=False, init="greedy-k-means++", n_init=3
    )


@pytest.mark.distributed
def test_greedy_starts_on_two_processes_equal_one():
    x, _ = blobs(n=600, dim=8)
    expected = kmeans(x, 6, iterations=8, spherical=False, init="greedy-k-means++", n_init=3)
    results = run_distributed(_restarted_kmeans_on_shard, 2, x)
    for centroids, _ in results:
        torch.testing.assert_close(centroids, expected[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([a for _, a in results]), expected[1])
