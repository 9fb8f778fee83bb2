"""Segmentation models on medfm encoders: dense decoders (UNETR, U-Net), promptable (SAM-style), in-context."""

from medfm.models.seg.registry import DECODERS, SegmentationModel, build_segmentation_model

__all__ = ["DECODERS", "SegmentationModel", "build_segmentation_model"]
