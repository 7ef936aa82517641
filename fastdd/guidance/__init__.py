"""Each method's math in one module named after it, usable from `fastdd.sampling.GuidedSampler` or any other loop.

- igd.py   IGD: deviation guidance G_D, influence guidance G_I, real gradients, Algorithm 2, the surrogate bundle
- dap.py   DAP: Mercer-kernel representativeness guidance on DiT block features
- mgd3.py  MGD3: mode guidance (+ torch k-means of the real latents)
- sam.py   SAM: self-adaptive memory DiT fine-tuning (a training method, not a guidance)
- d3hr.py  D3HR: DDIM inversion + representative group sampling (a pipeline, not a guidance)
- igds.py  IGDS: information guidance (+ its variational estimator)

Their run wiring (options, presets, caching) is in the module of the same name under `fastdd.methods`.
"""

from ..data.latents import encode_latents
from .d3hr import class_group, distill_class, inverted_class_statistics, select_group
from .dap import JLProjection, MercerGuidance, RealFeatures, real_features
from .igd import (
    DeviationGuidance,
    InfluenceGuidance,
    SurrogateBundle,
    adaptive_scale,
    deviation_gradient,
    influence_gradient,
    influence_loss,
    load_digits_surrogate,
    real_gradients,
    select_checkpoints,
)
from .igds import (
    InformationEstimator,
    InformationGuidance,
    beta_for_ipc,
    information_gradient,
    train_information_estimator,
)
from .mgd3 import ModeGuidance, fit_modes, kmeans, mode_update
from .sam import SamMemory, difffit_parameters, finetune_sam, save_finetuned, to_difffit

__all__ = [
    "DeviationGuidance",
    "deviation_gradient",
    "InfluenceGuidance",
    "adaptive_scale",
    "influence_gradient",
    "influence_loss",
    "real_gradients",
    "select_checkpoints",
    "SurrogateBundle",
    "load_digits_surrogate",
    "MercerGuidance",
    "RealFeatures",
    "real_features",
    "JLProjection",
    "ModeGuidance",
    "encode_latents",
    "fit_modes",
    "kmeans",
    "mode_update",
    "SamMemory",
    "difffit_parameters",
    "finetune_sam",
    "save_finetuned",
    "to_difffit",
    "class_group",
    "distill_class",
    "inverted_class_statistics",
    "select_group",
    "InformationEstimator",
    "InformationGuidance",
    "beta_for_ipc",
    "information_gradient",
    "train_information_estimator",
]
