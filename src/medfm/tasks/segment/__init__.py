"""Segmentation tasks: train / predict / evaluate dense models, promptable and in-context segmentation."""
