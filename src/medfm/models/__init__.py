"""Encoders (ViT, large-kernel CNN, hybrid; 2D/3D), heads, decoders and checkpoint I/O.

from medfm.models import create_encoder, load_encoder, save_encoder
enc = create_encoder("vit_tiny", spatial_dims=3, img_size=96, in_chans=1)
"""

from medfm.models.base import Encoder
from medfm.models.io import load_encoder, save_encoder
from medfm.models.registry import ENCODERS, create_encoder, list_encoders

__all__ = ["ENCODERS", "Encoder", "create_encoder", "list_encoders", "load_encoder", "save_encoder"]
