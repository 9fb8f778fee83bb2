"""Cross-modal retrieval: FAISS indexes over joint-space embeddings of a dataset, and Recall@K both ways.

Embeddings are L2-normalised, so FAISS's inner-product index ranks by cosine similarity. An index directory
holds ``images.faiss`` and ``texts.faiss`` (one vector per case) and ``cases.json`` (case id, patient id,
report per row) so that a hit can be shown with its report and id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfm.errors import InputError


def embed_dataset(model: Any, ds: Any, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings (N, D), text embeddings (N, D)) of an ImageTextDataset."""
    imgs = []
    for i in range(0, len(ds), batch_size):
        x = torch.stack([ds.image(j) for j in range(i, min(i + batch_size, len(ds)))])
        imgs.append(model.encode_images(x, batch_size))
    img = torch.cat(imgs) if imgs else torch.zeros(0, model.cfg.proj_dim)
    return img, model.encode_texts(list(ds.texts), batch_size)


def recall_at_k(
    sim: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[int, float]:
    """Fraction of queries (rows of ``sim``) with a relevant item among their top k."""
    order = sim.argsort(dim=1, descending=True)
    hits = relevant.gather(1, order)
    return {k: float(hits[:, :k].any(1).float().mean()) for k in ks}


def retrieval_metrics(
    img: torch.Tensor, txt: torch.Tensor, texts: list[str] | None = None, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, Any]:
    """Recall@K image->text and text->image. The relevant item is the query's own pair; with ``texts`` given,
    any case with the identical report also counts (so duplicate normal reports are not scored as misses),
    reported separately as ``*_text``. Chance level is k / N."""
    n = img.shape[0]
    sim = img @ txt.t()
    eye = torch.eye(n, dtype=torch.bool)
    out: dict[str, Any] = {"n": n}
    for k, v in recall_at_k(sim, eye, ks).items():
        out[f"i2t_R@{k}"] = v
    for k, v in recall_at_k(sim.t(), eye, ks).items():
        out[f"t2i_R@{k}"] = v
    if texts is not None:
        from medfm.train.clip_losses import same_text

        same = same_text(list(texts))
        for k, v in recall_at_k(sim, same, ks).items():
            out[f"i2t_R@{k}_text"] = v
        for k, v in recall_at_k(sim.t(), same, ks).items():
            out[f"t2i_R@{k}_text"] = v
    out["chance"] = {f"R@{k}": min(1.0, k / max(n, 1)) for k in ks}
    return out


@dataclass
class CaseIndex:
    """FAISS inner-product indexes over the image and text embeddings of a set of cases."""

    images: Any
    texts: Any
    cases: list[dict[str, str]]

    @classmethod
    def build(
        cls,
        img: torch.Tensor,
        txt: torch.Tensor,
        case_ids: list[str],
        reports: list[str],
        patient_ids: list[str] | None = None,
    ) -> CaseIndex:
        import faiss

        def make(e: torch.Tensor) -> Any:
            a = np.ascontiguousarray(e.numpy().astype(np.float32))
            faiss.normalize_L2(a)
            ix = faiss.IndexFlatIP(a.shape[1])
            ix.add(a)
            return ix

        pids = patient_ids or [""] * len(case_ids)
        cases = [{"case_id": c, "patient_id": p, "report": r} for c, p, r in zip(case_ids, pids, reports)]
        return cls(make(img), make(txt), cases)

    def __len__(self) -> int:
        return len(self.cases)

    def search(
        self, query: torch.Tensor, k: int = 5, modality: str = "text"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (Q, k), row indices (Q, k)) of the nearest cases by their ``modality`` embedding."""
        import faiss

        q = np.ascontiguousarray(query.reshape(-1, query.shape[-1]).numpy().astype(np.float32))
        faiss.normalize_L2(q)
        ix = self.texts if modality == "text" else self.images
        return ix.search(q, min(k, len(self)))

    def save(self, out: str | Path) -> Path:
        import faiss

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.images, str(out / "images.faiss"))
        faiss.write_index(self.texts, str(out / "texts.faiss"))
        (out / "cases.json").write_text(json.dumps(self.cases))
        return out

    @classmethod
    def load(cls, path: str | Path) -> CaseIndex:
        import faiss

        p = Path(path)
        for f in ("images.faiss", "texts.faiss", "cases.json"):
            if not (p / f).is_file():
                raise InputError(p, f"not a retrieval index (missing {f}); build one with `medfm retrieve`")
        return cls(
            faiss.read_index(str(p / "images.faiss")),
            faiss.read_index(str(p / "texts.faiss")),
            json.loads((p / "cases.json").read_text()),
        )
