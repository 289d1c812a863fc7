import numpy as np
import pytest
import torch

from agreement.sinkhorn import sinkhorn
from tests.helpers.distributed import run_distributed


def swav_sinkhorn_float64(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """SwAV's formula evaluated directly in float64: Q = exp(S / eps)^T, then alternate normalisations."""
    q = np.exp(scores.astype(np.float64) / epsilon).T
    num_prototypes, batch = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= num_prototypes
        q /= q.sum(axis=0, keepdims=True)
        q /= batch
    q *= batch
    return q.T


@pytest.mark.parametrize("shape", [(8, 5), (64, 30), (17, 100)])
@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_matches_direct_float64_formula(shape, iterations):
    scores = torch.nn.functional.normalize(torch.randn(*shape), dim=1) @ torch.nn.functional.normalize(
        torch.randn(shape[1], shape[1]), dim=1
    )
    expected = swav_sinkhorn_float64(scores.numpy(), 0.05, iterations)
    result = sinkhorn(scores, epsilon=0.05, iterations=iterations)
    assert result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_marginals_converge_to_equipartition():
    scores = torch.randn(256, 16)
    q = sinkhorn(scores, epsilon=0.5, iterations=200)
    torch.testing.assert_close(q.sum(1), torch.ones(256))
    # Each prototype receives B / K samples' worth of mass.
    torch.testing.assert_close(q.sum(0), torch.full((16,), 256 / 16), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_computes_in_float32_for_any_input_dtype(dtype):
    scores = torch.randn(32, 10)
    result = sinkhorn(scores.to(dtype))
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, sinkhorn(scores.to(dtype).float()))


def test_stable_on_extreme_scores():
    scores = torch.randn(64, 20) * 1e3  # scores / epsilon up to ~1e5: exp overflows in the direct formula
    result = sinkhorn(scores, epsilon=0.05)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result.sum(1), torch.ones(64))
    assert (result >= 0).all()


def test_hard_input_gives_one_hot_rows_when_already_balanced():
    scores = torch.eye(4).repeat(3, 1) * 10
    result = sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(result, torch.eye(4).repeat(3, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("scores", "kwargs", "message"),
    [
        (torch.randn(4), {}, "2-D"),
        (torch.zeros(0, 3), {}, "empty"),
        (torch.tensor([[0.0, float("nan")]]), {}, "NaN"),
        (torch.tensor([[0.0, float("inf")]]), {}, "NaN or inf"),
        (torch.randn(4, 3), {"epsilon": 0.0}, "epsilon"),
        (torch.randn(4, 3), {"iterations": 0}, "iterations"),
    ],
)
def test_bad_input_raises(scores, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sinkhorn(scores, **kwargs)


def _sinkhorn_on_shard(rank, world_size, scores):
    shard = scores.chunk(world_size)[rank]
    return sinkhorn(shard, epsilon=0.05, iterations=3)


@pytest.mark.distributed
def test_two_processes_equal_one():
    scores = torch.randn(24, 7) * 3
    expected = sinkhorn(scores)
    results = run_distributed(_sinkhorn_on_shard, 2, scores)
    torch.testing.assert_close(torch.cat(results), expected, rtol=1e-5, atol=1e-6)
