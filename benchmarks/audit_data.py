"""Inputs of bench_audit.py: the prepared stores, the planted phantom cohorts, the MAE encoder and the
linear-probe classifiers, each cached under the work folder (a rerun only redoes what is missing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

try:  # run as a script: benchmarks/ is on sys.path
    import label_efficiency as bench
except ImportError:  # pragma: no cover - imported as benchmarks.<name> from the repo root
    from benchmarks import label_efficiency as bench

from medfm.data.phantom.cohorts import flip_labels, plant_site_marker, select_cases
from medfm.data.store import read_manifest
from medfm.paths import shared_data_dir

# The encoder of bench_breastmnist / bench_tb (vit_tiny, 4 blocks of width 128), patch 8 at 64 px.
ENCODER_ARGS = '{"depth": 4, "embed_dim": 128, "num_heads": 4}'
FINDING_LABEL = "effusion"  # the phantom finding the planted cohorts are built on (large, visible at 64 px)


def done(p: Path) -> bool:
    return (p / "summary.json").is_file()


def tb_stores(work: Path, size: int) -> dict[str, Path]:
    """The two TB hospitals (fixed split of the folder's manifest) as one store each, lung masks kept."""
    tb = bench.prepare(shared_data_dir() / "cxr_lung_seg", work / f"tb_{size}", size, labels="tuberculosis")
    site = read_manifest(tb)["site"].astype(str).to_numpy()
    out = {}
    for name in ("shenzhen", "montgomery"):
        p = work / f"tb_{name}_{size}"
        if not done(p):
            select_cases(tb, p, site == name)
        out[name] = p
    return out


def covid_store(work: Path, size: int) -> Path:
    """COVID-19 (finding mentions COVID-19) vs other findings; rows whose finding is 'todo' are left out;
    the hospital/location is the site."""
    from medfm.data.prepare import PrepareConfig, prepare

    out = work / f"covid_{size}"
    if done(out):
        return out
    src = shared_data_dir() / "covid_cxr_notes"
    m = pd.read_csv(src / "manifest.csv")
    m = m[m["finding"].astype(str).str.strip().str.lower() != "todo"]
    rows = pd.DataFrame({"image": [str((src / f).resolve()) for f in m["image"]],
                         "covid": m["finding"].astype(str).str.contains("COVID-19").astype(int).to_numpy(),
                         "patient_id": m["patient_id"].astype(str).to_numpy(), "sex": m["sex"].to_numpy(),
                         "age": m["age"].to_numpy(), "site": m["location"].fillna("").astype(str).to_numpy()})
    work.mkdir(parents=True, exist_ok=True)
    csv = work / "covid_manifest.csv"
    rows.to_csv(csv, index=False)
    prepare(csv, out, PrepareConfig(size=size, labels=["covid"], allow_outside=[str(src)]), progress=False)
    return out


def breast_store(work: Path, size: int) -> Path:
    """BreastMNIST ultrasound without its labels (a foreign batch for the chest X-ray model: monitor mode)."""
    b = bench.prepare("medmnist:breastmnist", work / f"breastmnist_{size}", size)
    out = work / f"breastmnist_{size}_unlabelled"
    if not done(out):
        select_cases(b, out, drop_labels=True)
    return out


def phantom_store(work: Path, name: str, n: int, seed: int, size: int, fractions=(0.4, 0.1, 0.5)) -> Path:
    """A two-site phantom CXR set with finding masks, prepared with the finding label; the test split is
    half the cases so subgroup FNRs are estimated on hundreds of positives."""
    from medfm.data.phantom import write_phantom
    from medfm.data.prepare import PrepareConfig, prepare

    out = work / f"{name}_{size}"
    if done(out):
        return out
    raw = work / f"{name}_raw"
    write_phantom("cxr", n, raw, seed=seed, size=size, sites=2, mask_set="findings", workers=2)
    man = pd.read_csv(raw / "manifest.csv")
    man["split"] = ""  # re-split by patient with the fractions above
    man.to_csv(raw / "manifest.csv", index=False)
    prepare(raw, out, PrepareConfig(size=size, labels=[FINDING_LABEL], fractions=tuple(fractions)),
            progress=False)
    return out


def cohorts(work: Path, base: Path, flip_rate: float, marker_corr: float) -> dict[str, Path]:
    out = {"flip": work / "cohort_flip", "marker": work / "cohort_marker"}
    if not done(out["flip"]):
        flip_labels(base, out["flip"], "site", "site_a", rate=flip_rate, seed=0)
    if not done(out["marker"]):
        plant_site_marker(base, out["marker"], correlation=marker_corr, test_rate=0.5, seed=0)
    return out


def finding_stores(work: Path, base: Path) -> dict[str, Path]:
    """The base phantom relabelled with each finding (same images and finding masks)."""
    from medfm.data.phantom import FINDINGS

    out = {}
    for f in FINDINGS:
        p = work / f"phantom_{f}"
        if not done(p):
            select_cases(base, p, label=f)
        out[f] = p
    return out


def encoder(work: Path, size: int, steps: int, stores: list[Path]) -> Path:
    """MAE pretraining (medfm.train, as `medfm pretrain mae`) on the train splits of ``stores``, labels
    unused."""
    pool = bench.merge_pool(stores, work / f"pool_{size}")
    return bench.pretrain(pool, work / f"mae_{size}_s{steps}", steps, size, 8, ENCODER_ARGS)


def classifier(enc_run: Path, store: Path, out: Path, seed: int = 0) -> Path:
    """A linear probe (medfm adapt --methods linear, 100 % labels) saved as a classifier run."""
    import medfm
    from medfm.tasks.adapt.single import fit_classifier

    if not (out / "config.json").is_file():
        fit_classifier(medfm.load_encoder(enc_run), store, out, method="linear", seed=seed)
    return out


def images_masks(store: Path, split: str, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, masks, labels) of one split (masks zeros where a case has none)."""
    from medfm.data.store import PreparedDataset

    ds = PreparedDataset(store, split)
    imgs = np.stack([ds.image_array(i) for i in range(len(ds))])
    masks = np.stack([ds[i]["mask"].numpy() if "mask" in ds[i] else np.zeros(imgs.shape[2:], np.int64)
                      for i in range(len(ds))])
    return imgs, masks, ds.manifest[label].astype(int).to_numpy()
