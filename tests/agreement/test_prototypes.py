import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agreement.prototypes import ProjectionHead, Prototypes


def test_normalize_puts_every_prototype_on_the_unit_sphere():
    prototypes = Prototypes(8, [5, 3])
    with torch.no_grad():
        for layer in prototypes.heads:
            layer.weight.mul_(torch.rand(layer.weight.shape[0], 1) * 10 + 0.1)
    directions = [F.normalize(layer.weight.detach().clone(), dim=1) for layer in prototypes.heads]
    prototypes.normalize_()
    for layer, direction in zip(prototypes.heads, directions):
        torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(layer.weight.shape[0]))
        torch.testing.assert_close(layer.weight, direction)
        assert layer.weight.requires_grad


def test_forward_gives_one_score_matrix_per_head():
    prototypes = Prototypes(6, [4, 7, 2])
    z = F.normalize(torch.randn(5, 6), dim=1)
    scores = prototypes(z)
    assert [tuple(s.shape) for s in scores] == [(5, 4), (5, 7), (5, 2)]
    for head, s in enumerate(scores):
        torch.testing.assert_close(s, z @ prototypes.weight(head).T)
    assert prototypes.num_heads == 3 and prototypes.num_prototypes == [4, 7, 2]


def test_single_integer_gives_one_head_without_bias():
    prototypes = Prototypes(4, 10)
    assert prototypes.num_heads == 1
    assert all(layer.bias is None for layer in prototypes.heads)
    assert len(prototypes(torch.randn(3, 4))) == 1


def test_set_centroids_overwrites_only_that_head():
    prototypes = Prototypes(3, [2, 4])
    before = prototypes.weight(0).detach().clone()
    centroids = torch.randn(4, 3, dtype=torch.float64)
    prototypes.set_centroids(1, centroids)
    torch.testing.assert_close(prototypes.weight(1).detach(), centroids.float())
    torch.testing.assert_close(prototypes.weight(0).detach(), before)
    z = torch.randn(2, 3)
    torch.testing.assert_close(prototypes(z)[1], z @ centroids.float().T)


def test_freezing_drops_prototype_gradients_for_the_first_steps():
    prototypes = Prototypes(4, [3, 2], freeze_steps=2)
    optimizer = torch.optim.SGD(prototypes.parameters(), lr=1.0)
    z = torch.randn(5, 4)
    for step in range(4):
        before = [p.detach().clone() for p in prototypes.parameters()]
        optimizer.zero_grad()
        sum(s.sum() for s in prototypes(z)).backward()
        dropped = prototypes.zero_grad_if_frozen(step)
        optimizer.step()
        assert dropped == prototypes.is_frozen(step) == (step < 2)
        changed = [not torch.equal(b, p) for b, p in zip(before, prototypes.parameters())]
        assert all(changed) if step >= 2 else not any(changed)


def test_no_freezing_by_default():
    assert not Prototypes(4, 3).is_frozen(0)


def test_prototypes_reject_bad_num_prototypes():
    with pytest.raises(ValueError, match="num_prototypes must be a positive integer or a non-empty list"):
        Prototypes(4, [3, 0])


def test_prototypes_reject_bad_dim():
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        Prototypes(0, 3)


def test_prototypes_reject_negative_freeze_steps():
    with pytest.raises(ValueError, match="freeze_steps must be a non-negative"):
        Prototypes(4, 3, freeze_steps=-1)


def test_forward_rejects_wrong_dimension():
    with pytest.raises(ValueError, match=r"input must have shape \(N, 4\)"):
        Prototypes(4, 3)(torch.randn(2, 5))


def test_set_centroids_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"centroids for head 0 must have shape \(3, 4\)"):
        Prototypes(4, 3).set_centroids(0, torch.randn(4, 4))


def test_set_centroids_rejects_unknown_head():
    with pytest.raises(ValueError, match=r"head must be an integer in \[0, 1\)"):
        Prototypes(4, 3).set_centroids(1, torch.randn(3, 4))


def test_set_centroids_rejects_non_finite():
    centroids = torch.randn(3, 4)
    centroids[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        Prototypes(4, 3).set_centroids(0, centroids)


def test_is_frozen_rejects_negative_step():
    with pytest.raises(ValueError, match="step must be a non-negative"):
        Prototypes(4, 3, freeze_steps=1).is_frozen(-1)


# ------------------------------------------------------------------------------------------ ProjectionHead


def test_projection_head_layers_and_shape():
    head = ProjectionHead(16, 32, 8, num_layers=3)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [32, 32, 8]
    assert head(torch.randn(4, 16)).shape == (4, 8)


def test_projection_head_without_batch_norm():
    head = ProjectionHead(16, 32, 8, batch_norm=False)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert head[0].bias is not None


def test_projection_head_linear_and_identity():
    linear = ProjectionHead(16, 0, 8)
    assert len(linear) == 1 and isinstance(linear[0], nn.Linear) and linear[0].out_features == 8
    assert isinstance(ProjectionHead(16, 32, 8, num_layers=1)[0], nn.Linear)
    identity = ProjectionHead(16, 32, 16, num_layers=0)
    x = torch.randn(3, 16)
    assert torch.equal(identity(x), x)


def test_projection_head_trains():
    head = ProjectionHead(6, 12, 4)
    head(torch.randn(5, 6)).square().sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_projection_head_rejects_identity_with_other_out_dim():
    with pytest.raises(ValueError, match="num_layers=0 is the identity"):
        ProjectionHead(16, 32, 8, num_layers=0)


def test_projection_head_rejects_bad_dims():
    with pytest.raises(ValueError, match="out_dim must be an integer >= 1"):
        ProjectionHead(16, 32, 0)
