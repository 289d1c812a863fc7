"""Shared clustering and agreement utilities: k-means, Sinkhorn, prototypes, memory banks, agreement losses,
matching, clustering metrics and kNN evaluation, all correct across processes; and the infrastructure the method
packages share: the offline open_clip factory (``agreement.clip``), optional imports (``agreement.optional``) and
run folders (``agreement.runs``)."""

from agreement import metrics
from agreement.clustering import DeepClusterV2Clustering, SwAVClustering
from agreement.kmeans import kmeans
from agreement.memory import FeatureQueue, MemoryBank
from agreement.prototypes import ProjectionHead, Prototypes
from agreement.sinkhorn import sinkhorn

__all__ = [
    "DeepClusterV2Clustering",
    "FeatureQueue",
    "MemoryBank",
    "ProjectionHead",
    "Prototypes",
    "SwAVClustering",
    "kmeans",
    "metrics",
    "sinkhorn",
]
