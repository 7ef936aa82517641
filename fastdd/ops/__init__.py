"""fastdd.ops: fused guidance kernels with a plain PyTorch reference for each (see reference.py)."""

from ._backend import BACKENDS, OP_BACKENDS, resolve_backend
from ._checks import value_checks
from .cosine_memory import CosineMemory, max_cosine, most_similar_index
from .grad_cosine import grad_cosine, grad_dot_and_norm
from .group_sampling import group_sampling
from .mercer import mercer_distance

__all__ = [
    "BACKENDS",
    "OP_BACKENDS",
    "resolve_backend",
    "value_checks",
    "CosineMemory",
    "max_cosine",
    "most_similar_index",
    "grad_cosine",
    "grad_dot_and_norm",
    "group_sampling",
    "mercer_distance",
]
