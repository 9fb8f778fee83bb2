"""Encoders (ViT, large-kernel CNN, hybrid; 2D/3D), heads, decoders and checkpoint I/O."""
