import numpy as np
import pytest
import torch

from agreement import dist
from agreement.knn import gather_features, kmeans_probe, knn_accuracy, linear_probe, weighted_knn_predict
from tests.helpers.distributed import run_distributed


def _blobs(n, dim, num_classes, seed, spread=1.0):
    """Gaussian class blobs; the centres depend only on (dim, num_classes) so train and test sets share them."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1000 + dim)) * 2
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return centres[labels] + spread * torch.randn(n, dim, generator=gen), labels


def test_votes_match_direct_numpy_evaluation():
    train, labels = _blobs(12, 4, 3, seed=1, spread=2.0)
    query, _ = _blobs(5, 4, 3, seed=2, spread=2.0)
    k, temperature = 4, 0.5
    pred, scores = weighted_knn_predict(train, labels, query, num_classes=3, k=k, temperature=temperature)

    tr = train.double().numpy()
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    expected = np.zeros((5, 3))
    for q, row in enumerate(query.double().numpy()):
        sims = tr @ (row / np.linalg.norm(row))
        for i in np.argsort(-sims)[:k]:
            expected[q, labels[i]] += np.exp(sims[i] / temperature)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pred.numpy(), expected.argmax(axis=1))
    assert pred.dtype == torch.long and scores.dtype == torch.float32 and scores.shape == (5, 3)


def test_k1_on_training_points_returns_their_labels():
    train, labels = _blobs(50, 8, 5, seed=3, spread=3.0)
    for backend in ("torch", "faiss"):
        pred, _ = weighted_knn_predict(train, labels, train, num_classes=5, k=1, backend=backend)
        assert torch.equal(pred, labels)


def test_faiss_and_torch_backends_agree():
    train, labels = _blobs(400, 16, 6, seed=4, spread=2.5)
    query, _ = _blobs(150, 16, 6, seed=5, spread=2.5)
    pred_t, scores_t = weighted_knn_predict(train, labels, query, 6, k=10, backend="torch")
    pred_f, scores_f = weighted_knn_predict(train, labels, query, 6, k=10, backend="faiss", chunk_size=37)
    assert torch.equal(pred_t, pred_f)
    torch.testing.assert_close(scores_t, scores_f, rtol=1e-4, atol=1e-5)


def test_chunking_does_not_change_results():
    train, labels = _blobs(300, 8, 4, seed=6, spread=2.0)
    query, _ = _blobs(103, 8, 4, seed=7, spread=2.0)
    full = weighted_knn_predict(train, labels, query, 4, k=7, chunk_size=4096)
    for chunk_size in (1, 10, 64):
        chunked = weighted_knn_predict(train, labels, query, 4, k=7, chunk_size=chunk_size)
        assert torch.equal(full[0], chunked[0])
        torch.testing.assert_close(full[1], chunked[1])


def test_k_is_clamped_and_small_temperature_stays_finite():
    train, labels = _blobs(6, 3, 2, seed=8)
    query, _ = _blobs(4, 3, 2, seed=9)
    pred_big, scores_big = weighted_knn_predict(train, labels, query, 2, k=100)
    pred_all, scores_all = weighted_knn_predict(train, labels, query, 2, k=6)
    assert torch.equal(pred_big, pred_all)
    torch.testing.assert_close(scores_big, scores_all)
    _, scores_cold = weighted_knn_predict(train, labels, query, 2, k=6, temperature=1e-3)
    assert torch.isfinite(scores_cold).all()
    torch.testing.assert_close(scores_cold.sum(dim=1), torch.ones(4))


def test_knn_accuracy_on_separable_blobs():
    train, labels = _blobs(300, 16, 5, seed=10, spread=0.3)
    query, query_labels = _blobs(100, 16, 5, seed=20, spread=0.3)
    assert knn_accuracy(train, labels, query, query_labels, num_classes=5, k=5) == 1.0
    # Shuffled labels: chance level, far from perfect.
    shuffled = labels[torch.randperm(labels.numel())]
    assert knn_accuracy(train, shuffled, query, query_labels, num_classes=5, k=5) < 0.6


def _batches(features, labels, batch_size):
    return [
        (features[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)
    ]


def _gathered_knn(rank, world_size, train, labels, query):
    # Uneven split: rank 0 holds the first half rounded down.
    bounds = np.linspace(0, train.shape[0], world_size + 1).astype(int)
    local = slice(bounds[rank], bounds[rank + 1])
    all_train = dist.all_gather(train[local].clone())
    all_labels = dist.all_gather(labels[local].clone())
    pred, scores = weighted_knn_predict(all_train, all_labels, query, num_classes=4, k=5)
    # Sharded extraction: 7 batches split 4 / 3 between ranks, and a single batch that rank 1 never sees.
    sharded = gather_features(lambda b: (b[0] * 2, b[1]), _batches(train, labels, 9))
    lonely = gather_features(lambda b: (b[0], b[1]), _batches(query, torch.zeros(20, dtype=torch.long), 20))
    return all_train, pred, scores, sharded, lonely


@pytest.mark.distributed
def test_knn_on_gathered_features_equals_single_process():
    train, labels = _blobs(61, 8, 4, seed=11, spread=2.0)
    query, _ = _blobs(20, 8, 4, seed=12, spread=2.0)
    pred, scores = weighted_knn_predict(train, labels, query, num_classes=4, k=5)
    results = run_distributed(_gathered_knn, 2, train, labels, query)
    # Rank 0 extracted batches 0, 2, 4, 6 and rank 1 batches 1, 3, 5; gathering keeps rank order.
    order = torch.cat([torch.arange(b * 9, min(b * 9 + 9, 61)) for b in (0, 2, 4, 6, 1, 3, 5)])
    for gathered, rank_pred, rank_scores, sharded, lonely in results:
        assert torch.equal(gathered, train)
        assert torch.equal(rank_pred, pred)
        torch.testing.assert_close(rank_scores, scores)
        assert torch.equal(sharded[0], train[order] * 2) and torch.equal(sharded[1], labels[order])
        assert torch.equal(lonely[0], query) and lonely[1].shape == (20,)


def test_gather_features_single_process_flattens_and_keeps_order():
    images = torch.randn(10, 2, 3, 3)
    labels = torch.arange(10, dtype=torch.int32).view(10, 1)
    feats, labs = gather_features(lambda b: b, _batches(images, labels, 4))
    assert feats.shape == (10, 18) and labs.dtype == torch.long
    assert torch.equal(feats, images.flatten(1)) and torch.equal(labs, torch.arange(10))
    empty_feats, empty_labels = gather_features(lambda b: b, [])
    assert empty_feats.shape == (0, 0) and empty_labels.shape == (0,)


def test_linear_probe_matches_sklearn_logistic_regression():
    # Imported here so the spawned ranks of the distributed test, which import this module, stay light.
    from sklearn.linear_model import LogisticRegression

    train, labels = _blobs(300, 10, 4, seed=13, spread=2.5)
    test, test_labels = _blobs(200, 10, 4, seed=14, spread=2.5)
    acc = linear_probe(train, labels, test, test_labels, num_classes=4, epochs=200, weight_decay=1e-3)

    mean, std = train.mean(0), train.std(0, unbiased=False)
    # sklearn minimises C * sum(CE) + ||W||^2 / 2, ours mean(CE) + wd/2 ||W||^2: C = 1 / (n * wd).
    clf = LogisticRegression(C=1 / (300 * 1e-3), max_iter=2000, tol=1e-8)
    clf.fit(((train - mean) / std).numpy(), labels.numpy())
    expected = clf.score(((test - mean) / std).numpy(), test_labels.numpy())
    assert 0.5 < expected < 1.0  # the problem is neither trivial nor hopeless
    assert acc == pytest.approx(expected, abs=1.5 / 200)


def test_linear_probe_is_deterministic_and_adam_works():
    train, labels = _blobs(200, 6, 3, seed=15, spread=1.5)
    test, test_labels = _blobs(100, 6, 3, seed=16, spread=1.5)
    torch.manual_seed(0)
    first = linear_probe(train, labels, test, test_labels, num_classes=3, optimizer="adam", epochs=150)
    torch.manual_seed(0)
    second = linear_probe(train, labels, test, test_labels, num_classes=3, optimizer="adam", epochs=150)
    lbfgs = linear_probe(train, labels, test, test_labels, num_classes=3)
    assert first == second
    assert abs(first - lbfgs) <= 0.05
    with torch.inference_mode():
        assert linear_probe(train, labels, test, test_labels, num_classes=3) == lbfgs


GOOD = (torch.randn(10, 4), torch.arange(10) % 2, torch.randn(3, 4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_features": torch.zeros(0, 4), "train_labels": torch.zeros(0, dtype=torch.long)}, "empty"),
        ({"query_features": torch.zeros(0, 4)}, "query_features is empty"),
        ({"train_features": torch.full((10, 4), float("nan"))}, "NaN or infinite"),
        ({"query_features": torch.tensor([[float("inf"), 0, 0, 0]])}, "NaN or infinite"),
        ({"query_features": torch.randn(3, 5)}, "differ in dimension"),
        ({"train_features": torch.randn(10)}, "must be 2-D"),
        ({"train_labels": torch.arange(9) % 2}, "train_labels has 9 entries"),
        ({"train_labels": torch.arange(10)}, r"must lie in \[0, 2\)"),
        ({"train_labels": torch.zeros(10)}, "integer labels"),
        ({"train_features": torch.ones(10, 4, dtype=torch.long)}, "floating point"),
        ({"k": 0}, "k must be a positive integer"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"chunk_size": 0}, "chunk_size must be"),
        ({"backend": "annoy"}, "backend must be one of"),
        ({"num_classes": 0}, "num_classes must be"),
    ],
)
def test_knn_validation(kwargs, message):
    args = {"train_features": GOOD[0], "train_labels": GOOD[1], "query_features": GOOD[2], "num_classes": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        weighted_knn_predict(**args)


def test_knn_accuracy_and_probe_validation():
    train, labels, query = GOOD
    with pytest.raises(ValueError, match="query_labels has 2 entries"):
        knn_accuracy(train, labels, query, torch.tensor([0, 1]), num_classes=2)
    with pytest.raises(ValueError, match="test_labels has 2 entries"):
        linear_probe(train, labels, query, torch.tensor([0, 1]), num_classes=2)
    with pytest.raises(ValueError, match="differ in dimension"):
        linear_probe(train, labels, torch.randn(3, 2), torch.tensor([0, 1, 0]), num_classes=2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        linear_probe(train * float("nan"), labels, query, torch.tensor([0, 1, 0]), num_classes=2)
    with pytest.raises(ValueError, match="epochs must be"):
        linear_probe(train, labels, query, torch.tensor([0, 1, 0]), num_classes=2, epochs=0)
    with pytest.raises(ValueError, match="lr must be"):
        linear_probe(train, labels, query, torch.tensor([0, 1, 0]), num_classes=2, lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay must be"):
        linear_probe(train, labels, query, torch.tensor([0, 1, 0]), num_classes=2, weight_decay=-1.0)
    with pytest.raises(ValueError, match="optimizer must be"):
        linear_probe(train, labels, query, torch.tensor([0, 1, 0]), num_classes=2, optimizer="sgd")


def directions_with_spread_norms(n_per_class: int = 60, dim: int = 8, seed: int = 0):
    """Three classes 20 degrees apart in direction; every class spans norms from 0.2 to 5."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, 4)))[0].T
    directions = np.cos(np.radians(20)) * basis[0] + np.sin(np.radians(20)) * basis[1:]
    labels = np.repeat(np.arange(3), n_per_class)
    norms = rng.uniform(0.2, 5.0, size=len(labels))[:, None]
    points = (directions[labels] + 0.03 * rng.normal(size=(len(labels), dim))) * norms
    return torch.tensor(points, dtype=torch.float32), torch.tensor(labels)


def test_kmeans_probe_clusters_by_direction_as_the_knn_vote_does():
    features, labels = directions_with_spread_norms()
    result = kmeans_probe(features, labels, num_classes=3)
    assert result["accuracy"] == 1.0 and result["nmi"] == pytest.approx(1.0) and result["ari"] == 1.0
    assert result["contingency"] == [[60, 0, 0], [0, 60, 0], [0, 0, 60]]  # columns in majority-class order
    # Euclidean k-means splits the same points by norm: the probe's cosine geometry is what separates them.
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    euclidean = sklearn_cluster.KMeans(3, n_init=10, random_state=0).fit_predict(features.numpy())
    table = np.bincount(euclidean * 3 + labels.numpy(), minlength=9).reshape(3, 3)
    assert table.max(axis=1).sum() / len(labels) < 0.7


def test_kmeans_probe_scores_match_sklearn_and_ignore_class_ids():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    labels = torch.tensor(rng.integers(0, 4, 400))
    features = (
        torch.tensor(rng.normal(size=(400, 6)), dtype=torch.float32)
        + 0.8 * torch.nn.functional.one_hot(labels, 6).float()
    )
    result = kmeans_probe(features, labels, num_classes=4, seed=3)
    renamed = kmeans_probe(features, (labels + 1) % 4, num_classes=4, seed=3)
    assert {k: renamed[k] for k in ("accuracy", "nmi", "ari")} == {
        k: result[k] for k in ("accuracy", "nmi", "ari")
    }
    table = np.asarray(result["contingency"])
    assert table.sum() == 400 and table.shape == (4, 4)
    assert table.max(axis=0).sum() / 400 >= result["accuracy"]  # purity bounds the one-to-one accuracy
    clusters = np.argmax(table, axis=0)  # majority class of each column, in order
    assert list(clusters) == sorted(clusters)
    # Against scikit-learn's metrics on the same partition, rebuilt from the table.
    true = np.repeat(np.repeat(np.arange(4), 4), table.ravel())
    pred = np.repeat(np.tile(np.arange(4), 4), table.ravel())
    assert result["nmi"] == pytest.approx(metrics.normalized_mutual_info_score(true, pred), abs=1e-12)
    assert result["ari"] == pytest.approx(metrics.adjusted_rand_score(true, pred), abs=1e-12)
    assert 0.25 < result["accuracy"] < 1.0


def test_kmeans_probe_rejects_bad_inputs():
    features, labels = directions_with_spread_norms(n_per_class=2)
    with pytest.raises(ValueError, match="labels has 5 entries but the features have 6 rows"):
        kmeans_probe(features, labels[:5], num_classes=3)
    with pytest.raises(ValueError, match="needs at least num_classes=10 points, got 6"):
        kmeans_probe(features, labels, num_classes=10)
    with pytest.raises(ValueError, match="features contains NaN"):
        kmeans_probe(features * float("nan"), labels, num_classes=3)
