"""fastdd: fused kernels and a guided sampler for diffusion-based dataset distillation."""
__version__ = "0.1.0"
