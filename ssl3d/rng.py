"""Random-number-generator state as checkpoint data (kept here for imports; it lives in :mod:`agreement.rng`)."""

from agreement.rng import rng_state, set_rng_state

__all__ = ["rng_state", "set_rng_state"]
