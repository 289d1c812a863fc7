import numpy as np
import pytest
import torch

from agreement.kmeans import inertia
from benchmarks.entities import scale_episode
from entities.evaluation import official_stages
from entities.metrics import evaluate
from entities.names import Gazetteer
from entities.pipeline import DiscoveryOptions, discover, discover_records
from entities.records import FaceRecords, RecordsError, load_records, records_from_rows, save_records
from entities.stages import (
    agree_on_names,
    cluster_faces,
    cluster_name_graph,
    one_name_per_frame,
    random_weak_labels,
    refine_with_prototypes,
    vote_scores,
    weak_label_distribution,
    weak_label_graph,
)
from entities.synthetic import EpisodeConfig, make_episode


def test_weak_label_graph_counts_duplicates_and_baseline():
    weak = weak_label_graph([[0, 0, 2], [], [1]], num_classes=3)
    np.testing.assert_array_equal(weak.to_dense(), [[2, 0, 1], [0, 0, 0], [0, 1, 0]])
    probs = weak_label_distribution(weak, unknown_id=2)
    np.testing.assert_allclose(probs, [[2 / 3, 0, 1 / 3], [0, 0, 1], [0, 1, 0]])
    draws = np.stack([random_weak_labels([[0, 0, 2], [], [1]], 2, seed) for seed in range(300)])
    assert (draws[:, 1] == 2).all() and (draws[:, 2] == 1).all()
    assert 0.55 < (draws[:, 0] == 0).mean() < 0.78


def test_majority_and_frequency_votes():
    # Cluster 0: Unknown is said everywhere, so it wins by volume; the frequency vote picks the name that is
    # over-represented in the cluster instead. Cluster 2 has no names at all.
    weak = weak_label_graph([[2, 2, 0], [2, 0], [2, 2], [2, 2, 1], [1]], 3)
    clusters = np.array([0, 0, 1, 1, 1])
    graph = cluster_name_graph(clusters, weak, num_clusters=3)
    np.testing.assert_array_equal(graph.to_dense(), [[2, 0, 3], [0, 2, 4], [0, 0, 0]])
    assert agree_on_names(vote_scores(graph, "majority"), unknown_id=2).tolist() == [2, 2, 2]
    assert agree_on_names(vote_scores(graph, "frequency", 1.0), unknown_id=2).tolist() == [0, 1, 2]


def test_one_name_per_frame_hungarian():
    # Two faces of one frame both agreed "0"; the second face's cluster also supports "1".
    scores = np.array([[0.9, 0.0, 0.1], [0.6, 0.4, 0.0], [0.7, 0.3, 0.0]])
    labels, changed = one_name_per_frame(np.array([0, 0, 1]), scores, np.array([0, 0, 0]), unknown_id=2)
    assert labels.tolist() == [0, 1, 0] and changed == 1


def test_prototype_refinement_single_pass_matches_official_rule():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [4.8, 5.0], [0.2, 0.1], [5.1, 4.9], [9.0, 0.0]])
    stage2 = np.array([0, 0, 1, 1, 2, 2, 2])  # class 2 (most frequent) holds one face of each other class
    # By hand: prototypes are class means; faces of class 2 go to the nearest one, the others stay.
    protos = np.array([x[stage2 == c].mean(0) for c in range(3)])
    nearest = ((x[stage2 == 2, None] - protos[None]) ** 2).sum(-1).argmin(1)
    one_pass, passes = refine_with_prototypes(x, stage2, 3, "most_frequent", max_iterations=1)
    assert one_pass[:4].tolist() == [0, 0, 1, 1] and one_pass[4:].tolist() == nearest.tolist() == [0, 1, 2]
    assert passes == 1
    stable, passes = refine_with_prototypes(x, stage2, 3, "most_frequent", max_iterations=10)
    assert stable.tolist() == [0, 0, 1, 1, 0, 1, 2] and passes == 1  # the second pass changes nothing


def test_discover_on_synthetic_episode_beats_the_weak_baseline():
    records, cast = make_episode(EpisodeConfig(num_scenes=60))
    result = discover_records(records, cast, seed=0)
    assert len(result) == len(records) and set(result) <= set(cast) | {"Unknown"}
    metrics = result.evaluate(records.labels)
    stage1 = metrics["stage 1: random weak label (expected)"]
    stage2 = metrics["stage 2: visual entity agreement"]
    stage3 = metrics["stage 3: prototype refinement"]
    assert stage2["accuracy"] > stage1["accuracy"] + 0.25
    # Refinement keeps a pass only if it raises the agreement with the weak names; here it never costs.
    assert stage3["mean_per_class_accuracy"] >= stage2["mean_per_class_accuracy"] > 0.8
    again = discover_records(records, cast, seed=0)
    np.testing.assert_array_equal(again.stage3, result.stage3)
    # the options object passed whole, and single settings changing it, give the same run
    options = DiscoveryOptions(vote="majority", refine_iterations=1)
    whole = discover_records(records, cast, options, seed=0)
    single = discover_records(records, cast, seed=0, vote="majority", refine_iterations=1)
    np.testing.assert_array_equal(whole.stage3, single.stage3)
    with pytest.raises(TypeError, match="unknown discovery settings votes; the settings are: k, "):
        discover_records(records, cast, votes="majority")


def test_records_round_trip_json_and_parquet(tmp_path):
    records, _ = make_episode(EpisodeConfig(num_scenes=4))
    for name in ("faces.json", "faces.parquet"):
        path = save_records(records, tmp_path / name)
        loaded = load_records(path)
        assert loaded.frames == records.frames and loaded.weak_names == records.weak_names
        assert loaded.labels == records.labels
        np.testing.assert_allclose(loaded.embeddings, records.embeddings, rtol=1e-6)


def test_embeddings_of_mixed_dimension_raise():
    rows = [
        {"frame": 0, "names": ["A"], "embedding": [0.1, 0.2, 0.3]},
        {"frame": 0, "names": ["A"], "embedding": [0.1, 0.2]},
        {"frame": 1, "names": [], "embedding": [0.3, 0.2]},
    ]
    with pytest.raises(
        RecordsError, match=r"mixed dimensions \(2 faces of dimension 2, 1 faces of dimension 3\)"
    ):
        records_from_rows(rows, "faces.json")
    with pytest.raises(RecordsError, match="mixed dimensions"):
        discover([[0.1, 0.2, 0.3], [0.1, 0.2]], [["A"], []], [0, 1], ["A"])


def test_discover_clamps_k_and_handles_faces_without_names():
    records = FaceRecords(
        frames=["f0", "f0", "f1"],
        weak_names=[[], [], []],
        embeddings=np.eye(3, dtype=np.float32),
    )
    with pytest.warns(UserWarning, match="no face has a weak name"):
        result = discover_records(records, ["A"], k=2)
    assert list(result) == ["Unknown"] * 3


def test_subsample_fit_is_as_tight_as_the_full_fit():
    # k=30 over 200 people has many equally good local optima, so compare the k-means objective, not labels.
    records, _ = scale_episode(12_000, dim=64, seed=1)
    x = records.embeddings
    points = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)

    def objective(assignments):
        labels = torch.from_numpy(assignments)
        centroids = torch.zeros(30, x.shape[1]).index_add_(0, labels, points)
        centroids /= torch.bincount(labels, minlength=30).clamp_min(1)[:, None]
        return inertia(points, centroids, labels)

    full = objective(cluster_faces(x, 30, iterations=50, sample_size=None, seed=0))
    sampled = objective(cluster_faces(x, 30, iterations=50, sample_size=3000, full_iterations=5, seed=0))
    assert sampled <= 1.01 * full


def test_discover_at_scale_is_as_accurate_as_the_official_pipeline():
    # The benchmark's comparison at a size a test can afford, the subsample path included.
    records, cast = scale_episode(10_000, dim=64, seed=2)
    gazetteer = Gazetteer(cast)
    classes = gazetteer.classes
    truth = [classes.index(name) for name in records.labels]
    weak_ids = [gazetteer.class_ids(names) for names in records.weak_names]
    _, official, _ = official_stages(records.embeddings, weak_ids, len(classes), seed=0)
    with pytest.warns(UserWarning, match="not in the cast"):
        ours = discover(
            records.embeddings, records.weak_names, records.frames, gazetteer, kmeans_sample_size=3000
        )
    for metric in ("accuracy", "mean_per_class_accuracy"):
        assert (
            evaluate(truth, ours.stage3, classes)[metric]
            >= evaluate(truth, official, classes)[metric] - 0.005
        )


def test_cast_never_named_warns_with_the_names_and_k_counts_named_classes():
    records, cast = make_episode(EpisodeConfig(num_scenes=20))
    with pytest.warns(UserWarning, match="cast members never named in the captions: Zed, Quinn"):
        result = discover_records(records, [*cast, "Zed", "Quinn"])
    assert result.k == 4 * (len(cast) + 1)  # the two silent names add no clusters
    assert not {"Zed", "Quinn"} & set(result)


def test_fewer_faces_than_clusters_warns_and_uses_one_cluster_per_face():
    records = FaceRecords(
        frames=["f0", "f0", "f1", "f2"],
        weak_names=[["A"], ["A", "B"], ["B"], []],
        embeddings=np.eye(4, dtype=np.float32),
    )
    with pytest.warns(UserWarning, match=r"only 4 faces for k=12 clusters; using k=4"):
        result = discover_records(records, ["A", "B"])
    assert result.k == 4 and len(result) == 4
