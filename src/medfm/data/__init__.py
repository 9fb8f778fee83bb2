"""Reading, preparing and generating medical imaging data."""

from medfm.data.sample import Sample

__all__ = ["Sample"]
