"""Multi-crop in the clustering heads, against the SwAV / DeepCluster-V2 losses written out in float64."""

import pytest
import torch
import torch.nn.functional as F

from agreement.clustering import DeepClusterV2Clustering, SwAVClustering
from agreement.sinkhorn import sinkhorn


def unit_views(count: int, batch: int = 6, dim: int = 8, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=1)
        for _ in range(count)
    ]


def test_swav_multi_crop_every_view_predicts_the_codes_of_the_large_views():
    views = unit_views(5)  # 2 large + 3 small
    head = SwAVClustering(8, [7], num_views=5, assign_views=2).double()
    prototypes = head.prototypes.weight(0)
    scores = [z @ prototypes.T for z in views]
    expected = 0.0
    for s in range(2):
        codes = sinkhorn(scores[s], 0.05, 3)
        for t in range(5):
            if t != s:
                expected += -(codes * F.log_softmax(scores[t] / 0.1, dim=1)).sum(1).mean() / (2 * 4)
    torch.testing.assert_close(head(views), expected)


def test_swav_queue_keeps_only_the_assigned_views():
    head = SwAVClustering(8, [7], queue_length=12, num_views=4, assign_views=2)
    head([z.float() for z in unit_views(4)])
    assert head.queue.num_views == 2 and len(head.queue) == 6


def test_deepcluster_multi_crop_remembers_the_large_views_and_trains_every_view():
    views = unit_views(4)
    head = DeepClusterV2Clustering(8, [3, 4], num_views=4, assign_views=2).double()
    head.allocate(6)
    index = torch.arange(6)
    head(views, index)  # fills the memory
    assert head.memory.num_views == 2
    torch.testing.assert_close(head.memory.features[1].double(), views[1], rtol=1e-6, atol=1e-6)
    head.recluster(seed=0)
    loss = head(views, index)
    expected = 0.0
    for h in range(2):
        prototypes = head.prototypes.weight(h)
        targets = head.assignments[h]
        for z in views:
            expected += F.cross_entropy(z @ prototypes.T / 0.1, targets) / (2 * 4)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("head", [SwAVClustering, DeepClusterV2Clustering])
def test_bad_view_counts_are_refused(head):
    with pytest.raises(ValueError, match="assign_views must be in"):
        head(8, [3], num_views=2, assign_views=3)
    with pytest.raises(ValueError, match="at least 2 views"):
        head(8, [3], num_views=1)
