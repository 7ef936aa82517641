"""Models: the DiT prior, VAE codecs, and the surrogate / evaluation networks."""

from .convnet import ConvNet
from .dit import DiT, dit_config, load_diffusers_dit, load_dit_checkpoint
from .replay_buffer import check_against_model, load_replay_buffer, select_snapshots, snapshot_to_flat
from .resnet import ResNet, ResNetAP
from .vae import LatentCodec, PixelCodec, load_vae

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
