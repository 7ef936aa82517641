"""Guidance methods, one file each, all pluggable into `fastdd.sampling.GuidedSampler` and usable alone."""
from .deviation import DeviationGuidance, deviation_gradient
from .influence import InfluenceGuidance, adaptive_scale, influence_gradient, influence_loss, real_gradients, select_checkpoints

__all__ = [
    "DeviationGuidance", "deviation_gradient",
    "InfluenceGuidance", "adaptive_scale", "influence_gradient", "influence_loss", "real_gradients", "select_checkpoints",
]
