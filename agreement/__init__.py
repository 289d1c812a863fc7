"""Shared clustering and agreement utilities: k-means, Sinkhorn, prototypes, memory banks, agreement losses,
matching, clustering metrics and kNN evaluation, all correct across processes."""
