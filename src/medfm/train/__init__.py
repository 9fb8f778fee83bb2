"""Self-supervised pretraining: objectives (MAE, contrastive), augmentations, data streams, Lightning trainer.

``CATALOG`` names the built-in objectives and the module that registers each, so the CLI can list them
without importing Lightning (slow to import); a new objective module adds one line here.
"""

from __future__ import annotations

CATALOG: dict[str, tuple[str, str]] = {
    "mae": ("medfm.train.mae", "Masked autoencoder: reconstruct 75% hidden patches (ViT encoders)."),
    "contrastive": (
        "medfm.train.contrastive",
        "SimCLR contrastive learning; positives by augmentation, same patient or same study.",
    ),
}
