"""Self-supervised pretraining: objectives (MAE, contrastive), augmentations, data streams, Lightning trainer.

``OBJECTIVES`` is the objectives registry. The built-in ones are declared here with their module and help,
so the CLI lists them without importing Lightning (slow to import); looking one up imports its module,
which registers the class (``@OBJECTIVES.register``). A new objective module adds one ``declare`` line.
"""

from __future__ import annotations

from medfm.registry import Registry

OBJECTIVES: Registry = Registry("objective")
OBJECTIVES.declare("mae", "medfm.train.mae",
                   "Masked autoencoder: reconstruct 75% hidden patches (ViT encoders).")
OBJECTIVES.declare("contrastive", "medfm.train.contrastive",
                   "SimCLR contrastive learning; positives by augmentation, same patient or same study.")
