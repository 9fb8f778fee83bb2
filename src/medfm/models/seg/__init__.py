"""Segmentation models on medfm encoders: dense (UNETR, U-Net), promptable (SAM), in-context."""

from medfm.models.seg.registry import DECODERS, SegmentationModel, build_segmentation_model

__all__ = ["DECODERS", "SegmentationModel", "build_segmentation_model"]
