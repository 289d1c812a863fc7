"""Joint 2D/3D contrastive clustering with deformable slice attention, and fine-tuning on medical tasks."""
