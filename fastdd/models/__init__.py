"""Models: the DiT prior, VAE codecs, and the surrogate / evaluation networks.

diffusers' hint that `accelerate` is missing (printed at every model load; the small speed-up it offers does not
matter for fastdd's loads) is filtered out here, exactly that message, so that errors stay one line."""

import logging

from .convnet import ConvNet
from .dit import DiT, dit_config, load_diffusers_dit, load_dit_checkpoint
from .replay_buffer import check_against_model, load_replay_buffer, select_snapshots, snapshot_to_flat
from .resnet import ResNet, ResNetAP
from .vae import LatentCodec, PixelCodec, load_vae


class _WithoutAccelerateHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "because `accelerate` was not found" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_WithoutAccelerateHint())

__all__ = [
    "ConvNet",
    "DiT",
    "dit_config",
    "load_diffusers_dit",
    "load_dit_checkpoint",
    "LatentCodec",
    "PixelCodec",
    "load_vae",
    "ResNet",
    "ResNetAP",
    "check_against_model",
    "load_replay_buffer",
    "select_snapshots",
    "snapshot_to_flat",
]
