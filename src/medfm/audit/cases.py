"""The audit's inputs: the classifier under audit and every prepared dataset's predictions, features and
logits, checked once so the sections can assume clean arrays.

Which cases each dataset contributes:

- the **reference** (``datasets[0]``, the model's own, in-distribution data) is read split by split: its
  ``train`` cases fit the OOD model, its ``val`` cases set the OOD thresholds and the temperature (``train``
  when it has no ``val``, noted), its ``test`` cases are the internal evaluation;
- a **target** (any later dataset: another site, another hospital, a new batch) contributes *all* its
  cases: the model never trained on them, so every case is external evaluation data.

A dataset whose cases have no labels is audited in *monitor* mode: shift and OOD only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medfm.errors import InputError


@dataclass
class Cases:
    """One dataset's predictions. ``df`` is ``predict_store``'s table (one row per case, the store's manifest
    order) plus ``dataset`` and ``eval`` (the case counts as evaluation data); ``feats`` the embeddings,
    ``logits`` the (n, 2) binary logits (0, z)."""

    name: str
    path: Path
    role: str  # "reference" | "target"
    df: pd.DataFrame
    feats: np.ndarray
    logits: np.ndarray
    has_masks: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.df.loc[self.df["eval"], "label"].notna().any())

    @property
    def mode(self) -> str:
        return "audit" if self.labelled else "monitor (no labels: shift and OOD only)"

    def rows(self, split: str | None = None, labelled: bool = False) -> np.ndarray:
        """Boolean row mask: evaluation rows (``split`` None) or one split; optionally labelled ones only."""
        m = self.df["eval"] if split is None else self.df["split"] == split
        if labelled:
            m = m & self.df["label"].notna()
        return m.to_numpy(bool).copy()

    def patient_ids(self, m: np.ndarray) -> np.ndarray:
        """Patient ids prefixed with the dataset (two stores may reuse an id); internal to the bootstrap."""
        pid = self.df.loc[m, "patient_id"] if "patient_id" in self.df else self.df.loc[m, "case_id"]
        pid = pid.astype(str).where(pid.astype(str).str.len() > 0, self.df.loc[m, "case_id"].astype(str))
        return np.array([f"{self.name}:{p}" for p in pid], dtype=object)


class _Column(torch.nn.Module):
    """Keeps one output column of a multi-label head: (B, L) -> (B, 1)."""

    def __init__(self, j: int) -> None:
        super().__init__()
        self.j = j

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, self.j:self.j + 1]


def label_view(clf, label: str):
    """A multi-label classifier seen as the binary classifier of one of its labels (same encoder and
    weights, the label's own threshold), so every audit section applies unchanged."""
    from medfm.tasks.adapt.classifier import Classifier

    j = clf.classes.index(label)
    thr = clf.threshold[j] if isinstance(clf.threshold, list | tuple) else clf.threshold
    view = Classifier(clf.encoder, torch.nn.Sequential(clf.head, _Column(j)), "binary", ["0", "1"], thr,
                      clf.preprocessing, clf.method).eval()
    view.label_name = label
    return view


def load_audited_model(model: str | Path, device: str | torch.device = "cpu", label: str | None = None,
                       prompts: str | None = None):
    """The classifier under audit; any other run kind is a one-line InputError naming the kinds accepted.
    A multi-label classifier is audited one label at a time (``label``); a CLIP run as the zero-shot
    classifier of the finding ``label`` (``prompts`` as in ``medfm zeroshot``)."""
    from medfm.rundir import open_run
    from medfm.tasks.adapt.classifier import load_classifier

    run = open_run(model)
    if run.kind == "clip":
        from medfm.audit.zeroshot import zeroshot_classifier

        return zeroshot_classifier(run.path, label, prompts, device), run.config()
    if run.kind != "classifier":
        raise InputError(run.path, f"a '{run.kind}' run cannot be audited; the audit takes a 'classifier' "
                                   "run (from `medfm adapt --save-model`, OUT/model) or a 'clip' run "
                                   "(zero-shot, with --label)")
    clf = load_classifier(run.path, device=device)
    if clf.task == "multilabel":
        if label not in clf.classes:
            given = f", not {label!r}" if label else ""
            raise InputError(run.path, "a multi-label classifier is audited one label at a time: give "
                                       f"--label (one of {', '.join(clf.classes)}){given}")
        return label_view(clf, label), run.config()
    if clf.task != "binary":
        raise InputError(run.path, f"the audit supports binary (and multi-label, one label at a time) "
                                   f"classifiers; this one is {clf.task}")
    return clf, run.config()


def _check_store(path: Path, clf, need: tuple[str, ...]) -> dict:
    from medfm.data.store import read_manifest, read_summary

    if not path.is_dir():
        raise InputError(path, "no such prepared dataset directory")
    summary = read_summary(path)
    splits = set(read_manifest(path)["split"].dropna().astype(str))
    missing = [s for s in need if s not in splits]
    if missing:
        raise InputError(path, f"prepared dataset has no {'/'.join(missing)} split (splits present: "
                               f"{sorted(splits) or 'none'})")
    cols = summary.get("label_columns") or []
    label = getattr(clf, "label_name", None)
    if label and len(cols) > 1:  # a multi-label store: the audited label must be one of its columns
        if label not in cols:
            raise InputError(path, f"has no label column {label!r} (label columns: {', '.join(cols)})")
        cols = [label]
        summary = {**summary, "task": "binary"}
    if cols:
        task = summary.get("task")
        if len(cols) != 1 or task not in (None, "binary"):
            raise InputError(path, f"labels are {task} ({len(cols)} column(s)); the model is a binary "
                                   f"classifier of {clf.classes}")
        classes = (summary.get("label_classes") or {}).get(cols[0])
        if classes and [str(c) for c in classes] != list(clf.classes):
            raise InputError(path, f"label classes {[str(c) for c in classes]} do not match the model's "
                                   f"classes {clf.classes}")
    return summary


def _store_label(path: Path, label: str) -> np.ndarray:
    """One label column of a store, in manifest order (NaN where unlabelled, like predict_store)."""
    from medfm.data.store import PreparedDataset

    ds = PreparedDataset(path)
    y = ds.labels()
    if y is None:
        return np.full(len(ds), np.nan)
    if y.ndim == 2:
        y = y[:, list(ds.label_columns).index(label)]
    return np.where(y < 0, np.nan, y.astype(np.float64))


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    return out


def predict_cases(clf, path: str | Path, role: str, name: str, batch_size: int = 32,
                  need_splits: tuple[str, ...] = ()) -> Cases:
    """Predict every case of one store (features and logits included) and mark its evaluation rows."""
    from medfm.tasks.adapt.classifier import device_of, predict_store

    path = Path(path).expanduser()
    need = ("train", "test") if role == "reference" else ()
    summary = _check_store(path, clf, tuple(dict.fromkeys(need + need_splits)))
    df, feats = predict_store(clf, path, batch_size=batch_size, return_features=True)
    if getattr(clf, "label_name", None):
        df["label"] = _store_label(path, clf.label_name)
    with torch.no_grad():  # the head on the stored features: the logits energy and temperature need
        z = clf.head(torch.as_tensor(feats, device=device_of(clf))).double().cpu().numpy()
    z = z.reshape(len(df), -1)
    logits = np.c_[np.zeros(len(df)), z[:, 0]]
    lab = df["label"]
    bad = lab.notna() & ~lab.isin([0, 1])
    if bad.any():
        raise InputError(path, "labels must be 0/1 for a binary classifier; found "
                               f"{sorted(lab[bad].unique())}")
    df = df.assign(dataset=name, split=df["split"].astype(str) if "split" in df else "all")
    df["eval"] = (df["split"] == "test") if role == "reference" else True
    cases = Cases(name, path, role, df, feats.astype(np.float64), logits,
                  has_masks=bool(summary.get("has_masks")))
    if role == "reference" and not (df["split"] == "val").any():
        cases.notes.append(f"{name} has no val split: OOD thresholds and the temperature are fitted on its "
                           "train split (optimistic)")
    return cases


def load_cases(clf, datasets: list[str | Path], batch_size: int = 32, per_site: bool = False,
               progress=None) -> list[Cases]:
    """Predict every dataset; the first is the reference. The same store twice is an InputError."""
    if not datasets:
        raise InputError(None, "give at least one prepared dataset (the first is the reference)")
    seen: dict[Path, str] = {}
    taken: set[str] = set()
    out = []
    task = progress.add_task("predict datasets", total=len(datasets)) if progress else None
    for i, d in enumerate(datasets):
        p = Path(d).expanduser()
        key = p.resolve()
        if key in seen:
            raise InputError(p, "this dataset is given twice")
        name = _unique(p.name or "dataset", taken)
        seen[key] = name
        taken.add(name)
        out.append(predict_cases(clf, p, "reference" if i == 0 else "target", name, batch_size,
                                 ("train", "test") if per_site else ()))
        if progress:
            progress.advance(task)
    return out


def images_of(cases: Cases, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored images (uint8 or float, as stored) of the given row indices, and their masks (zeros where a
    case has none; None when none of them has one)."""
    from medfm.data.store import PreparedDataset

    ds = PreparedDataset(cases.path)
    imgs = np.stack([ds.image_array(int(i)) for i in rows])
    if not cases.has_masks:
        return imgs, None
    masks, any_mask = [], False
    for i in rows:
        item = ds[int(i)]
        if "mask" in item:
            masks.append(item["mask"].numpy())
            any_mask = True
        else:
            masks.append(np.zeros(imgs.shape[2:], np.int64))
    return imgs, (np.stack(masks) if any_mask else None)


def as_float(images: np.ndarray) -> torch.Tensor:
    """Images as the float tensor the model sees (uint8 -> [0, 1]); explanations need float inputs."""
    t = torch.as_tensor(np.asarray(images))
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
