"""Diffusion tables and step functions, classifier-free guidance, per-image seeds and the guided sampling loop."""

from ..models.precision import mixed_precision
from .acceleration import CudaGraphRecorder, StepGraphs
from .cfg import cfg_model_output, compat_cfg_model_output, guided_model
from .diffusion import GaussianDiffusion, diffusers_timesteps, linear_betas, space_timesteps
from .sampler import Guidance, GuidedSampler, StepContext, ddim_invert, sample_step
from .seeds import TrajectoryNoise, batch_trajectory_noise, image_generator, image_seed, splitmix64, trajectory_noise

__all__ = [
    "GaussianDiffusion",
    "linear_betas",
    "space_timesteps",
    "diffusers_timesteps",
    "cfg_model_output",
    "compat_cfg_model_output",
    "guided_model",
    "mixed_precision",
    "StepGraphs",
    "CudaGraphRecorder",
    "Guidance",
    "GuidedSampler",
    "StepContext",
    "ddim_invert",
    "sample_step",
    "TrajectoryNoise",
    "batch_trajectory_noise",
    "image_generator",
    "image_seed",
    "splitmix64",
    "trajectory_noise",
]
