"""Joint 2D/3D contrastive clustering with deformable slice attention, and fine-tuning on medical tasks."""

from ssl3d.attention import DeformableSliceAttention, MaskedSliceModel, SliceTransformer
from ssl3d.encoder import SliceEncoder
from ssl3d.module import JointSSL

__all__ = ["DeformableSliceAttention", "JointSSL", "MaskedSliceModel", "SliceEncoder", "SliceTransformer"]
