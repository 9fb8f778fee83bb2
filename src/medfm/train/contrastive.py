"""Contrastive pretraining (SimCLR) with optional metadata-defined positives (same patient / same study).

Pure losses first (NT-Xent and its multi-positive form), then the projection head, then the registered
objective. Works with any encoder whose ``forward`` returns a pooled embedding (CNN, ViT, hybrid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.train.objectives import OBJECTIVES, Objective


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent (SimCLR): row i of z1 and row i of z2 are positives, every other row of both is a negative."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def multi_positive_nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, groups: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """NT-Xent where every item of the same group (e.g. patient) is a positive (SupCon 'L_out' form).

    z1, z2: (B, D) the two views; groups: (B,) integer group ids. For each of the 2B anchors the loss averages
    -log softmax over its positives (the other view plus all other views of same-group items). With all groups
    distinct it equals :func:`nt_xent`.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    labels = torch.cat([groups, groups]).to(z.device)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = ((z @ z.T) / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(dim=1) / pos.sum(dim=1)
    return per_anchor.mean()


class ProjectionHead(nn.Module):
    """SimCLR projection MLP: Linear -> BatchNorm -> ReLU -> Linear. Discarded after pretraining."""

    def __init__(self, in_dim: int, hidden: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _embed_dim(encoder: nn.Module) -> int:
    d = int(getattr(encoder, "embed_dim", 0) or 0)
    if d:
        return d
    dims = getattr(encoder, "feature_dims", None)
    if dims:
        return int(dims[-1])
    raise ValueError(f"cannot tell the embedding size of {type(encoder).__name__}")


@OBJECTIVES.register(
    "contrastive", help="SimCLR contrastive learning; positives by augmentation, patient or study"
)
class ContrastiveObjective(Objective):
    """SimCLR objective (LightningModule); ``cfg.positives`` picks how positive pairs are formed."""

    name = "contrastive"

    def __init__(self, encoder: nn.Module, cfg: Any) -> None:
        super().__init__(encoder, cfg)
        self.head = ProjectionHead(_embed_dim(encoder), cfg.proj_hidden, cfg.proj_dim)

    def make_dataset(self, base: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        from medfm.train.augment import AugmentConfig, ViewAugment
        from medfm.train.datamodule import PairedViewsDataset

        aug = ViewAugment(self.cfg.size, AugmentConfig(flip_p=0.5 if self.cfg.flip else 0.0))
        return PairedViewsDataset(base, aug, self.cfg.seed, self.cfg.positives)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        n = batch["view1"].shape[0]
        z = self.head(self.encoder(torch.cat([batch["view1"], batch["view2"]])))
        z1, z2 = z[:n], z[n:]
        if self.cfg.positives == "augment":
            return nt_xent(z1, z2, self.cfg.temperature)
        return multi_positive_nt_xent(z1, z2, batch["group"], self.cfg.temperature)

    def save_figures(self, run_dir: Path, dataset: torch.utils.data.Dataset, tag: str = "") -> list[Path]:
        """views.png: a few (view 1, view 2) pairs as the model saw them (checks the augmentations)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = min(4, len(dataset))
        fig, axes = plt.subplots(n, 2, figsize=(4, 2 * n), squeeze=False)
        for i in range(n):
            item = dataset[(i, i)]
            for j, key in enumerate(("view1", "view2")):
                t = item[key].float()
                t = t[:, t.shape[1] // 2] if t.ndim == 4 else t
                axes[i, j].imshow(t[0].numpy(), cmap="gray", vmin=0, vmax=1)
                axes[i, j].axis("off")
                if i == 0:
                    axes[i, j].set_title(key, fontsize=9)
        fig.tight_layout()
        path = run_dir / "views.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]
