"""The engine behind `medfm serve`, `medfm pacs watch` and `medfm mcp`: models loaded once, and one function
per capability mapping an input file to a JSON-able result (plus the arrays overlays need).

Every result carries ``model`` (name, kind, content hash) and ``input`` (a salted hash of the file's bytes):
what produced it and from what, never a file name, a path or a DICOM identifier.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfm.errors import ConfigError, InputError
from medfm.serve.served import Served, load_served

# Decoded-pixel guard for untrusted uploads, far below the readers' archive default (2**28): a 4096^2 RGB
# image is 50M; a 512^3 volume 134M.
DEFAULT_MAX_PIXELS = 2**27


def _public(case_id: str, salt: str) -> str:
    from medfm.data.deid import hash_id

    return case_id if case_id.startswith("c_") else hash_id(case_id, salt, "c_")


@dataclass
class Index:
    """The cases similar-case search and reports draw on: a CLIP index and, per public id, the row it came
    from (to open a cited case). Patient ids are dropped on load."""

    index: Any
    dataset: Any
    rows: dict[str, int] = field(default_factory=dict)


@dataclass
class Engine:
    models: list[Served]
    salt: str = field(default_factory=lambda: secrets.token_hex(16))
    max_pixels: int = DEFAULT_MAX_PIXELS
    index: Index | None = None
    ood_refs: dict[str, Any] = field(default_factory=dict)  # model name -> (Gaussian, threshold)
    # PyTorch modules are not safe to call from several threads at once (hooks for saliency, autograd state).
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, runs: list[str | Path], index_data: str | Path | None = None,
             ood_reference: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
             salt: str | None = None) -> Engine:
        """Load every run once; ``index_data`` (image-report pairs) feeds similar cases and reports of a
        CLIP run; ``ood_reference`` (a prepared dataset) fits each classifier's out-of-distribution score."""
        if not runs:
            raise ConfigError("give at least one run directory or exported model to serve")
        models: list[Served] = []
        for r in runs:
            m = load_served(r)
            if any(o.name == m.name for o in models):
                m.name = f"{m.name}-{len(models)}"
            models.append(m)
        eng = cls(models, salt=salt or secrets.token_hex(16), max_pixels=int(max_pixels))
        if index_data is not None:
            eng.index = eng._build_index(Path(index_data))
        if ood_reference is not None:
            eng._fit_ood(Path(ood_reference))
        return eng

    def _build_index(self, data: Path) -> Index:
        from medfm.tasks.vlm.commands import dataset_for
        from medfm.tasks.vlm.retrieval import CaseIndex, embed_dataset

        clip = self.model(None, "similar")
        ds = dataset_for(clip.clip, data, "all")
        img, txt = embed_dataset(clip.clip, ds)
        ids = [_public(str(c), self.salt) for c in ds.case_ids]
        ix = CaseIndex.build(img, txt, ids, ds.texts, None)  # no patient ids: they would leak in results
        return Index(ix, ds, {c: i for i, c in enumerate(ids)})

    def _fit_ood(self, data: Path) -> None:
        from medfm.audit.ood import fit_gaussian, fit_threshold, mahalanobis_score
        from medfm.data.store import PreparedDataset

        ds = PreparedDataset(data)
        for m in self.models:
            clf = getattr(m.predictor, "kind", None) == "classifier" and m.source_kind == "classifier"
            if not clf:
                continue
            feats = self._features(m, np.stack([np.asarray(ds.image_array(i)) for i in range(len(ds))]))
            g = fit_gaussian(feats)
            self.ood_refs[m.name] = (g, fit_threshold(mahalanobis_score(g, feats)))

    # ---- choosing a model ----------------------------------------------------------------------------
    def model(self, name: str | None, capability: str) -> Served:
        """The named model, or the first that has ``capability``; ConfigError when none fits."""
        cands = [m for m in self.models if capability in m.capabilities]
        if name:
            named = [m for m in self.models if m.name == name]
            if not named:
                served = ", ".join(m.name for m in self.models)
                raise ConfigError(f"no model named '{name}'; served: {served}")
            if capability not in named[0].capabilities:
                raise ConfigError(f"model '{name}' cannot {capability} (it can: "
                                  f"{', '.join(named[0].capabilities)})")
            return named[0]
        if not cands:
            raise ConfigError(f"no served model can {capability}")
        return cands[0]

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for m in self.models:
            d = m.describe()
            if m.name in self.ood_refs:
                d["capabilities"] = [*d["capabilities"], "ood"]
            out.append(d)
        return out

    # ---- inputs --------------------------------------------------------------------------------------
    def input_id(self, path: str | Path) -> str:
        """A salted hash of the file's bytes: the same upload gets the same id within this service."""
        h = hashlib.sha256(self.salt.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "in_" + h.hexdigest()[:16]

    def check(self, path: str | Path) -> dict[str, Any]:
        """Header-only look at an input (format, shape) that refuses decompression bombs before decoding."""
        from medfm.data.read import probe

        info = probe(path, max_voxels=self.max_pixels)
        shape = info.get("shape") or ()
        n = int(np.prod([int(s) for s in shape])) if shape else 0
        if n > self.max_pixels:
            raise InputError(path, f"{n} decoded values exceed the service limit of {self.max_pixels}")
        return {k: info.get(k) for k in ("format", "shape")}

    def _case(self, path: str | Path) -> Any:
        from medfm.predict.inputs import Case

        return Case(0, "upload", "", str(path))

    def _grid_input(self, m: Served, path: str | Path) -> tuple[torch.Tensor, Any]:
        """(image at the model's grid (C, H, W), the input's native grid) as `medfm predict` reads it."""
        from medfm.predict.masks import read_seg_case

        return read_seg_case(self._case(path), m.spec, 2 if (m.predictor is None or m.predictor.seg is None)
                             else int(m.predictor.seg["spatial_dims"]))

    def _stamp(self, m: Served, path: str | Path) -> dict[str, Any]:
        return {"model": m.stamp(), "input": self.input_id(path)}

    # ---- classification ------------------------------------------------------------------------------
    def prepare_classify(self, path: str | Path, name: str | None = None) -> tuple[Served, torch.Tensor]:
        """The model and the (C, H, W) tensor it takes: the part of classify that micro-batching keeps per
        request."""
        from medfm.predict.inputs import read_case

        m = self.model(name, "classify")
        return m, read_case(self._case(path), m.spec)

    def infer_classify(self, m: Served, batch: torch.Tensor) -> np.ndarray:
        """Probabilities (B, K) of a stacked batch."""
        with self.lock, torch.inference_mode():
            probs, _ = m.predictor.infer(batch)
        return np.asarray(probs)

    def findings(self, m: Served, probs: np.ndarray) -> list[dict[str, Any]]:
        """One {name, probability, positive} per finding of one image's probabilities (K,)."""
        cols = m.predictor.columns(probs[None])
        task, classes = m.predictor.task, m.predictor.classes
        if task == "binary":  # the positive class, or the label column when classes are just 0 / 1
            name = classes[1] if len(classes) == 2 and classes[1] not in ("1", "True", "true") else (
                (m.label_columns or ["positive"])[0])
            return [{"name": name, "probability": round(float(cols["prob"][0]), 6),
                     "positive": bool(cols["pred"][0])}]
        names = classes if len(classes) == probs.shape[0] else [str(j) for j in range(probs.shape[0])]
        out = []
        for j, n in enumerate(names):
            pos = bool(cols[f"pred_{n}"][0]) if task == "multilabel" else int(cols["pred"][0]) == j
            out.append({"name": n, "probability": round(float(probs[j]), 6), "positive": pos})
        return out

    def classify(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        m, x = self.prepare_classify(path, name)
        probs = self.infer_classify(m, x[None])[0]
        return {"findings": self.findings(m, probs), **self._stamp(m, path)}

    def _features(self, m: Served, images: np.ndarray) -> np.ndarray:
        from medfm.tasks.adapt.classifier import predict_arrays

        with self.lock:
            _, feats = predict_arrays(m.predictor.module, images, batch_size=64)
        return feats

    def ood(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        """Mahalanobis distance of the image's features to the reference data, and whether it is beyond the
        reference's 95th percentile."""
        from medfm.audit.ood import mahalanobis_score
        from medfm.predict.inputs import read_case

        cands = [m for m in self.models if m.name in self.ood_refs and (not name or m.name == name)]
        if not cands:
            raise ConfigError("no OOD reference: start the service with --ood-reference PREPARED_DATA")
        m = cands[0]
        x = read_case(self._case(path), m.spec)
        g, thr = self.ood_refs[m.name]
        s = float(mahalanobis_score(g, self._features(m, x[None].numpy()))[0])
        return {"score": round(s, 4), "threshold": round(float(thr), 4), "out_of_distribution": s > thr,
                **self._stamp(m, path)}

    # ---- segmentation --------------------------------------------------------------------------------
    def segment(self, path: str | Path, name: str | None = None,
                boxes: list[list[float]] | None = None) -> tuple[dict[str, Any], np.ndarray]:
        """(result with per-class area fractions, uint8 label map on the input's own grid). With ``boxes``
        ([x0, y0, x1, y1] in input pixels) a promptable model segments inside them."""
        if boxes:
            return self._segment_boxes(path, name, boxes)
        from medfm.predict.masks import columns, segment

        m = self.model(name, "segment")
        x, grid = self._grid_input(m, path)
        with self.lock, torch.inference_mode():
            labels = segment(m.predictor.segmenter, m.predictor.seg, x, grid)
        k = int(m.predictor.seg["num_classes"])
        names = self.segment_names(m)
        res = {"segments": names, "areas": columns(labels, grid, names, k), **self._stamp(m, path)}
        return res, labels.numpy().astype(np.uint8)

    def segment_names(self, m: Served) -> list[str]:
        k = int(m.predictor.seg["num_classes"]) if m.predictor is not None else 2
        cls = m.predictor.classes if m.predictor is not None else []
        return cls if len(cls) == k - 1 else [f"class_{j}" for j in range(1, k)]

    def _segment_boxes(self, path: str | Path, name: str | None,
                       boxes: list[list[float]]) -> tuple[dict[str, Any], np.ndarray]:
        from medfm.tasks.segment.prompts import prompt_file

        m = self.model(name, "segment_box")
        if not all(isinstance(b, list | tuple) and len(b) == 4 for b in boxes):
            raise InputError(None, "boxes must be a list of [x0, y0, x1, y1] in the image's pixels")
        with self.lock, torch.inference_mode():
            mask, _ = prompt_file(m.promptable, path, m.spec, boxes=[[float(v) for v in b] for b in boxes])
        mask = mask.numpy().astype(np.uint8)
        frac = round(float((mask > 0).mean()), 6)
        return {"segments": ["prompted"], "areas": {"fraction_prompted": frac}, **self._stamp(m, path)}, mask

    # ---- explanation ---------------------------------------------------------------------------------
    def explain(self, path: str | Path, name: str | None = None, method: str | None = None,
                target: int | None = None) -> tuple[dict[str, Any], np.ndarray]:
        """(result, saliency map in [0, 1] on the input's grid) for the predicted class (or ``target``)."""
        from medfm.audit.explain import methods_for, saliency

        m = self.model(name, "explain")
        clf = m.predictor.module
        x, grid = self._grid_input(m, path)
        method = method or methods_for(clf.encoder)[0]
        with self.lock:
            sal = saliency(method, clf, x[None], target)[0].detach().float()
        if tuple(sal.shape) != tuple(x.shape[1:]):  # the encoder's own size -> the stored grid first
            sal = F.interpolate(sal[None, None], size=tuple(x.shape[1:]), mode="bilinear")[0, 0]
        return {"method": method, **self._stamp(m, path)}, _to_native(sal, grid)

    # ---- image-report models -------------------------------------------------------------------------
    def _clip_embed(self, m: Served, path: str | Path) -> torch.Tensor:
        from medfm.data.pairs import model_input

        with self.lock:
            return m.clip.encode_images(model_input(path, m.clip)[None])

    def zero_shot(self, path: str | Path, findings: list[str] | None = None,
                  name: str | None = None) -> dict[str, Any]:
        """Probability per finding from its positive vs negative prompt ensembles."""
        from medfm.tasks.vlm.prompts import default_prompts
        from medfm.tasks.vlm.zeroshot import class_embeddings, zeroshot_probs

        m = self.model(name, "zero_shot")
        emb = self._clip_embed(m, path)
        with self.lock, torch.no_grad():
            names, pos, neg = class_embeddings(m.clip, default_prompts(findings))
            p = zeroshot_probs(emb, pos, neg, float(m.clip.scale()))[0]
        out = [{"name": n, "probability": round(float(v), 6), "positive": bool(v >= 0.5)}
               for n, v in zip(names, p.tolist())]
        return {"findings": out, **self._stamp(m, path)}

    def _need_index(self) -> Index:
        if self.index is None:
            raise ConfigError("no case index: start the service with --index DATA (image-report pairs)")
        return self.index

    def similar(self, path: str | Path, k: int = 5, name: str | None = None) -> dict[str, Any]:
        """The ``k`` indexed cases whose images are nearest, with their reports."""
        m = self.model(name, "similar")
        ix = self._need_index()
        sims, rows = ix.index.search(self._clip_embed(m, path), k, "image")
        hits = [{"rank": r, "similarity": round(float(s), 4), "case_id": ix.index.cases[int(i)]["case_id"],
                 "report": ix.index.cases[int(i)]["report"]}
                for r, (s, i) in enumerate(zip(sims[0], rows[0]), 1) if i >= 0]
        return {"cases": hits, **self._stamp(m, path)}

    def report(self, path: str | Path, k: int = 5, name: str | None = None) -> dict[str, Any]:
        """A draft report composed from the ``k`` nearest indexed cases; every sentence comes from a cited
        case (``evidence``: case ids, similarity, their positive findings)."""
        from medfm.tasks.vlm.rag import rag_reports

        m = self.model(name, "report")
        ix = self._need_index()
        r = rag_reports(ix.index, self._clip_embed(m, path), k)[0]
        return {"report": r["report"], "votes": r["votes"], "evidence": r["evidence"], "cited": r["cited"],
                **self._stamp(m, path)}

    def case(self, case_id: str) -> dict[str, Any]:
        """An indexed case (its report; its image through ``case_image``)."""
        ix = self._need_index()
        if case_id not in ix.rows:
            raise InputError(None, f"case {case_id} is not in the index")
        return {"case_id": case_id, "report": ix.index.cases[ix.rows[case_id]]["report"]}

    def case_image(self, case_id: str) -> np.ndarray:
        ix = self._need_index()
        if case_id not in ix.rows:
            raise InputError(None, f"case {case_id} is not in the index")
        img = ix.dataset.image(ix.rows[case_id])
        return np.asarray(img[0] if img.ndim == 3 else img, np.float32)

    # ---- everything at once (PACS watcher, viewer) ---------------------------------------------------
    def analyse(self, path: str | Path) -> dict[str, Any]:
        """classify + segment with the first model of each kind that is served; the mask as ``_mask``."""
        out: dict[str, Any] = {"input": self.input_id(path), "models": []}
        caps = {c for m in self.models for c in m.capabilities}
        if "classify" in caps:
            r = self.classify(path)
            out["findings"], out["models"] = r["findings"], [r["model"]]
        if "segment" in caps:
            r, mask = self.segment(path)
            out |= {"segments": r["segments"], "areas": r["areas"], "_mask": mask}
            out["models"].append(r["model"])
        return out

    def analyse_dicom(self, ds: Any) -> Any:
        """A source DICOM instance -> medfm.pacs.types.InstanceResult (findings, mask on its pixel grid)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="medfm-") as tmp:
            f = Path(tmp) / "instance.dcm"
            ds.save_as(f, enforce_file_format=True)
            return self.instance_result(ds, self.analyse(f))

    def instance_result(self, ds: Any, r: dict[str, Any]) -> Any:
        """``analyse``'s result on DICOM instance ``ds`` as a medfm.pacs.types.InstanceResult."""
        from medfm.pacs.types import InstanceResult

        mask = r.get("_mask")
        if mask is not None and mask.shape != (int(ds.Rows), int(ds.Columns)):
            mask = None  # a volume or a resampled grid cannot be a SEG on this instance's frame
        models = r["models"]
        stamp = {"name": "+".join(m["name"] for m in models), "hash": "+".join(m["hash"] for m in models),
                 "version": _version()}
        return InstanceResult(ds, r.get("findings", []), mask, r.get("segments", []), stamp)

    # ---- display -------------------------------------------------------------------------------------
    def display(self, path: str | Path) -> np.ndarray:
        """The image as a viewer shows it: 2D float32 on its own grid (first channel, or the RGB mean; the
        middle slice of a volume), in the stored units (HU for CT)."""
        from medfm.data.refs import read_ref

        a = np.asarray(read_ref(str(path)).array, np.float32)
        a = a.mean(0) if a.shape[0] in (3, 4) and a.ndim == 3 else a[0]
        return a[a.shape[0] // 2] if a.ndim == 3 else a


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("medfm")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        return "0"


def _to_native(sal: torch.Tensor, grid: Any) -> np.ndarray:
    """A map on the model's grid back onto the input's pixels (undo letterbox pad / crop, then resize)."""
    m = sal[None, None]
    if grid.letterbox is not None:
        from medfm.data.normalize import crop_or_pad

        m = torch.from_numpy(crop_or_pad(m[0].numpy(), grid.letterbox))[None]
    if tuple(m.shape[2:]) != tuple(grid.shape):
        m = F.interpolate(m, size=tuple(grid.shape), mode="bilinear", align_corners=False)
    out = m[0, 0].numpy()
    lo, hi = float(out.min()), float(out.max())
    return ((out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)).astype(np.float32)
