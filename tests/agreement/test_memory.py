import io

import pytest
import torch

from agreement.memory import FeatureQueue, MemoryBank
from tests.helpers.distributed import run_distributed

SIZE, DIM, VIEWS = 12, 3, 2


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # Index 7 appears twice (as a distributed sampler's padding would), once on each half.
    index = torch.tensor([5, 0, 7, 11, 2, 7, 9])
    views = [torch.randn(index.numel(), DIM, generator=generator) for _ in range(VIEWS)]
    return index, views


# --------------------------------------------------------------------------------------------- MemoryBank


def test_update_writes_rows_at_their_global_indices():
    bank = MemoryBank(SIZE, DIM, VIEWS)
    index = torch.tensor([4, 1, 9])
    views = [torch.randn(3, DIM), torch.randn(3, DIM)]
    bank.update(index, views)
    for v in range(VIEWS):
        for row, i in enumerate(index.tolist()):
            assert torch.equal(bank.features[v, i], views[v][row])
    untouched = torch.ones(SIZE, dtype=torch.bool)
    untouched[index] = False
    assert torch.all(bank.features[:, untouched] == 0)
    assert bank.filled.tolist() == [i in (1, 4, 9) for i in range(SIZE)]
    assert bank.fill_fraction == pytest.approx(3 / SIZE)
    features, indices = bank.features_for_clustering(1)
    assert indices.tolist() == [1, 4, 9]
    assert torch.equal(features, views[1][[1, 0, 2]])


def test_update_overwrites_and_last_duplicate_wins():
    bank = MemoryBank(SIZE, DIM, VIEWS)
    bank.update(torch.tensor([3]), [torch.zeros(1, DIM), torch.zeros(1, DIM)])
    rows = torch.arange(3 * DIM, dtype=torch.float32).reshape(3, DIM)
    bank.update(torch.tensor([3, 6, 3]), torch.stack([rows, -rows]))
    assert torch.equal(bank.features[0, 3], rows[2]) and torch.equal(bank.features[1, 3], -rows[2])
    assert torch.equal(bank.features[0, 6], rows[1])
    assert bank.num_filled == 2


def test_list_and_stacked_features_are_equivalent_and_single_view_accepts_2d():
    index, views = _batch()
    a, b = MemoryBank(SIZE, DIM, VIEWS), MemoryBank(SIZE, DIM, VIEWS)
    a.update(index, views)
    b.update(index, torch.stack(views))
    assert torch.equal(a.features, b.features) and torch.equal(a.filled, b.filled)
    single = MemoryBank(SIZE, DIM, num_views=1)
    single.update(index, views[0])
    assert torch.equal(single.features[0], a.features[0])


def test_state_dict_round_trip_restores_identical_buffers():
    bank = MemoryBank(SIZE, DIM, VIEWS)
    bank.update(*_batch())
    assert set(bank.state_dict()) == {"features", "filled"}
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    fresh = MemoryBank(SIZE, DIM, VIEWS)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.features, bank.features)
    assert torch.equal(fresh.filled, bank.filled)
    assert fresh.features.dtype == torch.float32


def test_update_does_not_keep_the_graph():
    bank = MemoryBank(SIZE, DIM, 1)
    features = torch.randn(2, DIM, requires_grad=True)
    bank.update(torch.tensor([0, 1]), [features * 2])
    assert not bank.features.requires_grad


def test_reset_empties_the_bank():
    bank = MemoryBank(SIZE, DIM, VIEWS)
    bank.update(*_batch())
    bank.reset()
    assert bank.num_filled == 0 and torch.all(bank.features == 0)


def test_update_rejects_index_out_of_range():
    with pytest.raises(ValueError, match=r"index out of range \[0, 12\)"):
        MemoryBank(SIZE, DIM, 1).update(torch.tensor([3, 12]), [torch.randn(2, DIM)])


def test_update_rejects_negative_index():
    with pytest.raises(ValueError, match=r"index out of range \[0, 12\): min -1"):
        MemoryBank(SIZE, DIM, 1).update(torch.tensor([-1, 2]), [torch.randn(2, DIM)])


def test_update_rejects_batch_size_mismatch():
    with pytest.raises(ValueError, match="3 indices but 2 feature rows"):
        MemoryBank(SIZE, DIM, 1).update(torch.tensor([0, 1, 2]), [torch.randn(2, DIM)])


def test_update_rejects_wrong_feature_dim():
    with pytest.raises(ValueError, match=r"view 1 must have shape \(B, 3\)"):
        MemoryBank(SIZE, DIM, VIEWS).update(torch.tensor([0, 1]), [torch.randn(2, DIM), torch.randn(2, 4)])


def test_update_rejects_wrong_number_of_views():
    with pytest.raises(ValueError, match="expected 2 views, got 1"):
        MemoryBank(SIZE, DIM, VIEWS).update(torch.tensor([0, 1]), [torch.randn(2, DIM)])


def test_update_rejects_non_finite_features():
    features = torch.randn(2, DIM)
    features[1, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        MemoryBank(SIZE, DIM, 1).update(torch.tensor([0, 1]), [features])


def test_update_rejects_float_index():
    with pytest.raises(ValueError, match="index must be an integer tensor"):
        MemoryBank(SIZE, DIM, 1).update(torch.tensor([0.0, 1.0]), [torch.randn(2, DIM)])


def test_features_for_clustering_rejects_unknown_view():
    with pytest.raises(ValueError, match=r"view must be an integer in \[0, 2\)"):
        MemoryBank(SIZE, DIM, VIEWS).features_for_clustering(2)


def test_memory_bank_rejects_bad_size():
    with pytest.raises(ValueError, match="size must be a positive integer"):
        MemoryBank(0, DIM)


# ------------------------------------------------------------------------------------------- distributed


def _bank_on_rank(rank: int, world_size: int) -> dict:
    index, views = _batch()
    # Uneven shards: rank 0 takes the first 4 samples, rank 1 the last 3.
    lo, hi = (0, 4) if rank == 0 else (4, index.numel())
    bank = MemoryBank(SIZE, DIM, VIEWS)
    bank.update(index[lo:hi], [v[lo:hi] for v in views])
    # A second step from other samples, then an invalid input on rank 1 only.
    bank.update(torch.tensor([rank]), [torch.full((1, DIM), 10.0 + rank)] * VIEWS)
    bad_index = torch.tensor([SIZE if rank == 1 else 0])
    try:
        bank.update(bad_index, [torch.zeros(1, DIM)] * VIEWS)
        error = ""
    except ValueError as exc:
        error = str(exc)
    return {"state": bank.state_dict(), "error": error}


@pytest.fixture(scope="module")
def distributed_banks():
    return run_distributed(_bank_on_rank, 2)


@pytest.mark.distributed
def test_distributed_bank_is_identical_on_all_ranks_and_equals_one_process(distributed_banks):
    index, views = _batch()
    reference = MemoryBank(SIZE, DIM, VIEWS)
    reference.update(index, views)
    reference.update(torch.tensor([0, 1]), [torch.tensor([[10.0] * DIM, [11.0] * DIM])] * VIEWS)
    for result in distributed_banks:
        assert torch.equal(result["state"]["features"], reference.features)
        assert torch.equal(result["state"]["filled"], reference.filled)


@pytest.mark.distributed
def test_distributed_invalid_input_on_one_rank_raises_on_every_rank(distributed_banks):
    assert "index out of range" in distributed_banks[1]["error"]
    assert "another process passed invalid input" in distributed_banks[0]["error"]


# ------------------------------------------------------------------------------------------- FeatureQueue


def test_queue_is_fifo_with_newest_batch_first():
    queue = FeatureQueue(length=5, dim=1, num_views=2)
    batches = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [4.0]]), torch.tensor([[5.0], [6.0]])]
    queue.enqueue([batches[0], -batches[0]])
    assert len(queue) == 2 and not queue.is_full
    assert queue.get(0).flatten().tolist() == [1.0, 2.0]
    queue.enqueue([batches[1], -batches[1]])
    assert queue.get(0).flatten().tolist() == [3.0, 4.0, 1.0, 2.0]
    queue.enqueue([batches[2], -batches[2]])
    # The oldest row (2.0) fell off the end.
    assert queue.is_full and len(queue) == 5
    assert queue.get(0).flatten().tolist() == [5.0, 6.0, 3.0, 4.0, 1.0]
    assert queue.get(1).flatten().tolist() == [-5.0, -6.0, -3.0, -4.0, -1.0]
    queue.enqueue(torch.tensor([[[7.0]], [[-7.0]]]))
    assert queue.get(0).flatten().tolist() == [7.0, 5.0, 6.0, 3.0, 4.0]


def test_queue_get_returns_a_copy():
    queue = FeatureQueue(4, 2, num_views=1)
    queue.enqueue(torch.ones(2, 2))
    snapshot = queue.get(0)
    queue.enqueue(torch.zeros(2, 2))
    assert torch.all(snapshot == 1)


def test_queue_state_dict_round_trip():
    queue = FeatureQueue(6, 3, num_views=2)
    queue.enqueue([torch.randn(4, 3), torch.randn(4, 3)])
    fresh = FeatureQueue(6, 3, num_views=2)
    fresh.load_state_dict(queue.state_dict())
    assert set(queue.state_dict()) == {"queue", "count"}
    assert torch.equal(fresh.queue, queue.queue) and len(fresh) == 4
    queue.reset()
    assert len(queue) == 0 and torch.all(queue.queue == 0)


def test_queue_rejects_batch_longer_than_queue():
    with pytest.raises(ValueError, match="does not fit a queue of length 3"):
        FeatureQueue(3, 2, num_views=1).enqueue(torch.randn(4, 2))


def test_queue_rejects_wrong_dim():
    with pytest.raises(ValueError, match=r"view 0 must have shape \(B, 2\)"):
        FeatureQueue(3, 2, num_views=2).enqueue([torch.randn(1, 3), torch.randn(1, 2)])


def test_queue_rejects_non_finite():
    with pytest.raises(ValueError, match="NaN or inf"):
        FeatureQueue(3, 2, num_views=1).enqueue(torch.tensor([[float("nan"), 0.0]]))


def test_queue_rejects_bad_length():
    with pytest.raises(ValueError, match="length must be a positive integer"):
        FeatureQueue(0, 2)
