"""Distillation methods, one file each, usable from `fastdd.sampling.GuidedSampler` or from another repo's loop.

- influence.py   IGD influence guidance G_I (+ real gradients, Algorithm 2 checkpoint selection)
- deviation.py   IGD deviation guidance G_D
- mercer.py      DAP Mercer-kernel representativeness guidance
- mode.py        MGD3 mode guidance (+ torch k-means)
- memory.py      SAM self-adaptive memory DiT fine-tuning (a training method, not a guidance)
- d3hr.py        D3HR DDIM inversion + group sampling (a pipeline, not a guidance)
- information.py IGDS information guidance (+ its variational estimator)
"""
from .d3hr import distill_class, inverted_class_statistics, select_group
from .deviation import DeviationGuidance, deviation_gradient
from .influence import InfluenceGuidance, adaptive_scale, influence_gradient, influence_loss, real_gradients, select_checkpoints
from .information import InformationEstimator, InformationGuidance, beta_for_ipc, information_gradient, train_information_estimator
from .memory import SamMemory, difffit_parameters, finetune_sam, save_finetuned
from .mercer import JLProjection, MercerGuidance, RealFeatures, real_features
from .mode import ModeGuidance, encode_latents, fit_modes, kmeans, mode_update

__all__ = [
    "DeviationGuidance", "deviation_gradient",
    "InfluenceGuidance", "adaptive_scale", "influence_gradient", "influence_loss", "real_gradients", "select_checkpoints",
    "MercerGuidance", "RealFeatures", "real_features", "JLProjection",
    "ModeGuidance", "encode_latents", "fit_modes", "kmeans", "mode_update",
    "SamMemory", "difffit_parameters", "finetune_sam", "save_finetuned",
    "distill_class", "inverted_class_statistics", "select_group",
    "InformationEstimator", "InformationGuidance", "beta_for_ipc", "information_gradient", "train_information_estimator",
]
