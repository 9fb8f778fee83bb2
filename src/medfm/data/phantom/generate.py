"""Public API: one case in memory (`generate_cxr_case`, `generate_ct_case`) or a whole folder on disk
(`write_phantom`), deterministic by seed."""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medfm.data.phantom import anatomy2d
from medfm.data.phantom.cohort import FINDINGS, TAG_RENDER, TAG_REPORT, check_seed, plan_case, rng
from medfm.data.phantom.reports import make_report
from medfm.data.phantom.sites import Site, make_sites
from medfm.errors import ConfigError
from medfm.rundir import write_json

KINDS = ("cxr", "ct3d")
MASK_SETS = ("organs", "findings", "all")
EXTRA_COLUMNS = [
    "nodule_size_mm",
    "nodule_side",
    "nodule_zone",
    "nodule_lobe",
    "effusion_side",
    "effusion_size",
    "consolidation_side",
    "consolidation_zone",
    "consolidation_lobe",
    "pneumothorax_side",
    "pneumothorax_size",
    "ctr",
    "spacing_mm",
    "view",
    "study_number",
]
MANIFEST_COLUMNS = [
    "case_id",
    "image",
    "mask",
    "mask_organs",
    "mask_findings",
    "report",
    "patient_id",
    "study_id",
    "site",
    "sex",
    "age",
    "split",
    *FINDINGS,
    *EXTRA_COLUMNS,
]


@dataclass
class Case:
    """One generated case: image at the site's native depth, label maps and the manifest record."""

    image: np.ndarray  # (H, W) uint8/uint16 for cxr; (D, H, W) int16 HU for ct3d
    organs: np.ndarray  # label map, ids in ORGAN_LABELS
    findings: np.ndarray  # label map, ids in FINDING_LABELS
    record: dict[str, Any]
    spacing: tuple[float, ...]


def _check(kind: str, size: int, mask_set: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    lo = 32 if kind == "cxr" else 16
    if not lo <= size <= 4096:
        raise ConfigError(f"--size must be between {lo} and 4096 for {kind}, got {size}")
    if mask_set not in MASK_SETS:
        raise ConfigError(f"--mask-set must be one of {', '.join(MASK_SETS)}, got {mask_set!r}")


def combined_labels(kind: str) -> dict[int, str]:
    """Label ids of the 'all' mask set: organs first, findings after them (findings painted on top)."""
    organs = anatomy2d.ORGAN_LABELS if kind == "cxr" else _ct().ORGAN_LABELS
    off = max(organs)
    return {**organs, **{off + i: n for i, n in anatomy2d.FINDING_LABELS.items()}}


def combine(kind: str, organs: np.ndarray, findings: np.ndarray) -> np.ndarray:
    off = max(anatomy2d.ORGAN_LABELS if kind == "cxr" else _ct().ORGAN_LABELS)
    return np.where(findings > 0, findings + off, organs).astype(np.uint8)


def _ct():
    from medfm.data.phantom import ct3d

    return ct3d


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def make_case(
    kind: str, index: int, seed: int = 0, size: int | None = None, sites: int | list[Site] = 3
) -> Case:
    """Plan, render and describe case `index` of the phantom set `seed`."""
    size = size or (256 if kind == "cxr" else 64)
    _check(kind, size, "organs")
    seed = check_seed(seed)
    site_list = make_sites(sites) if isinstance(sites, int) else sites
    rec = plan_case(kind, index, seed, site_list)
    site = next(s for s in site_list if s.name == rec["site"])
    r = rng(seed, TAG_RENDER, index)
    if kind == "cxr":
        disp, organs, findings, meas = anatomy2d.render_cxr(rec, site, size, r)
        if site.bit_depth > 8:
            image = np.round(disp * (2**site.bit_depth - 1)).astype(np.uint16)
        else:
            image = np.round(disp * 255).astype(np.uint8)
        spacing: tuple[float, ...] = (meas["spacing_mm"], meas["spacing_mm"])
    else:
        image, organs, findings, meas = _ct().render_ct(rec, site, size, r)
        spacing = tuple(meas["spacing_mm"])
    rec.update({k: v for k, v in meas.items() if k != "spacing_mm"})
    rec["spacing_mm"] = meas["spacing_mm"] if kind == "cxr" else "x".join(f"{s:g}" for s in spacing)
    rec["report"] = make_report(rec, rng(seed, TAG_REPORT, index), "cxr" if kind == "cxr" else "ct")
    return Case(image, organs, findings, _public(rec), spacing)


def to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    return (
        np.round(image.astype(np.float32) / max(1, int(image.max() > 255) * 4095 or 255) * 255)
        .clip(0, 255)
        .astype(np.uint8)
    )


def generate_cxr_case(
    index: int, seed: int = 0, size: int = 256, sites: int = 3, mask_set: str = "organs"
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One chest radiograph in memory: (uint8 image (H, W), uint8 label map (H, W), record with report and
    labels). 12-bit sites are scaled to 8 bits here; `make_case` keeps the native depth."""
    _check("cxr", size, mask_set)
    c = make_case("cxr", index, seed, size, sites)
    img = (
        np.round(c.image.astype(np.float32) / 4095 * 255).astype(np.uint8)
        if c.image.dtype == np.uint16
        else c.image
    )
    return img, _mask(c, "cxr", mask_set), c.record


def generate_ct_case(
    index: int, seed: int = 0, size: int = 64, sites: int = 3, mask_set: str = "organs"
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One CT volume in memory: (int16 HU (D, H, W) with D the slice axis, uint8 label map, record)."""
    _check("ct3d", size, mask_set)
    c = make_case("ct3d", index, seed, size, sites)
    return c.image, _mask(c, "ct3d", mask_set), c.record


def _mask(c: Case, kind: str, mask_set: str) -> np.ndarray:
    if mask_set == "organs":
        return c.organs
    if mask_set == "findings":
        return c.findings
    return combine(kind, c.organs, c.findings)


# ------------------------------------------------------------------------------------------------ on disk
def _save_png(path: Path, a: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(a).save(tmp, format="PNG")
    os.replace(tmp, path)


def _save_nifti(path: Path, a: np.ndarray, spacing: tuple[float, ...]) -> None:
    """(D, H, W) array -> NIfTI with voxel axes (x, y, z) = (W, H, D) and a diagonal affine (RAS+ as
    rendered). gzip without a timestamp, so the same seed gives byte-identical files."""
    import nibabel as nib

    data = np.ascontiguousarray(np.transpose(a, (2, 1, 0)))
    sz, sy, sx = spacing
    img = nib.Nifti1Image(data, np.diag([sx, sy, sz, 1.0]))
    img.header.set_xyzt_units("mm")
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    tmp = path.with_name(path.name + ".tmp")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(img.to_bytes())
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _paths(kind: str, cid: str, mask_set: str) -> dict[str, str]:
    ext = ".png" if kind == "cxr" else ".nii.gz"
    p = {
        "image": f"images/{cid}{ext}",
        "mask_organs": f"masks/{cid}_organs{ext}",
        "mask_findings": f"masks/{cid}_findings{ext}",
    }
    p["mask"] = f"masks/{cid}_all{ext}" if mask_set == "all" else p[f"mask_{mask_set}"]
    return p


def _write_case(args: tuple[str, int, int, int, int, str, str]) -> bool:
    """Render and write one case unless its files exist (resume). Returns True if it rendered."""
    kind, index, seed, size, n_sites, mask_set, out = args
    root = Path(out)
    cid = f"{kind}_{index:07d}"
    paths = _paths(kind, cid, mask_set)
    if all((root / p).is_file() for p in set(paths.values())):
        return False
    c = make_case(kind, index, seed, size, n_sites)
    files = {"image": c.image, "mask_organs": c.organs, "mask_findings": c.findings}
    if mask_set == "all":
        files["mask"] = combine(kind, c.organs, c.findings)
    for key, arr in files.items():
        if kind == "cxr":
            _save_png(root / paths[key], arr)
        else:
            _save_nifti(root / paths[key], arr, c.spacing)
    return True


def _progress(it: Iterator[Any], total: int, desc: str) -> Iterator[Any]:
    if os.environ.get("MEDFM_PROGRESS", "1") == "0":
        return it
    from tqdm import tqdm

    return iter(tqdm(it, total=total, desc=desc, unit="case"))


def _manifest_rows(
    kind: str, n: int, seed: int, size: int, sites: list[Site], mask_set: str
) -> Iterator[dict[str, Any]]:
    """Records without pixels: planning and the report need no rendering, so resuming is cheap."""
    for i in range(n):
        rec = plan_case(kind, i, seed, sites)
        site = next(s for s in sites if s.name == rec["site"])
        if kind == "cxr":
            sp = anatomy2d.FOV_MM / (size * site.zoom)
            rec["spacing_mm"] = round(sp, 4)
        else:
            rec["spacing_mm"] = "x".join(f"{s:g}" for s in _ct().ct_spacing(site, size))
        rec["report"] = make_report(rec, rng(seed, TAG_REPORT, i), "cxr" if kind == "cxr" else "ct")
        rec.update(_paths(kind, rec["case_id"], mask_set))
        yield _public(rec)


def write_phantom(
    kind: str,
    n: int,
    out: str | Path,
    seed: int = 0,
    size: int | None = None,
    sites: int = 3,
    mask_set: str = "organs",
    workers: int = 1,
) -> Path:
    """Write a labelled phantom set to `out` (images/, masks/, manifest.csv, dataset.json) and return `out`.

    Streams case by case (never holds all images), skips cases whose files exist (resume), and rewrites the
    manifest at the end. `workers` > 1 renders in that many processes; output is identical either way.
    """
    size = size or (256 if kind == "cxr" else 64)
    _check(kind, size, mask_set)
    seed = check_seed(seed)
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    site_list = make_sites(sites)
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    jobs = ((kind, i, seed, size, sites, mask_set, str(root)) for i in range(n))
    if workers == 1:
        for _ in _progress(map(_write_case, jobs), n, f"phantom {kind}"):
            pass
    else:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            for _ in _progress(
                ex.map(_write_case, jobs, chunksize=max(1, min(32, n // (4 * workers)))), n, f"phantom {kind}"
            ):
                pass
    tmp = root / "manifest.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in _manifest_rows(kind, n, seed, size, site_list, mask_set):
            w.writerow(row)
    os.replace(tmp, root / "manifest.csv")
    write_json(root / "dataset.json", dataset_info(kind, n, seed, size, site_list, mask_set))
    return root


def dataset_info(kind: str, n: int, seed: int, size: int, sites: list[Site], mask_set: str) -> dict[str, Any]:
    organs = anatomy2d.ORGAN_LABELS if kind == "cxr" else _ct().ORGAN_LABELS
    labels = {"organs": organs, "findings": anatomy2d.FINDING_LABELS, "all": combined_labels(kind)}[mask_set]
    return {
        "name": f"medfm-phantom-{kind}",
        "kind": kind,
        "modality": "xray" if kind == "cxr" else "ct",
        "label_columns": list(FINDINGS),
        "task": "multilabel",
        "mask_labels": {str(k): v for k, v in labels.items()},
        "mask_set": mask_set,
        "mask_files": {
            "mask": f"label map of the '{mask_set}' set, ids in mask_labels (column `mask`)",
            "mask_organs": {"column": "mask_organs", "labels": {str(k): v for k, v in organs.items()}},
            "mask_findings": {
                "column": "mask_findings",
                "labels": {str(k): v for k, v in anatomy2d.FINDING_LABELS.items()},
                "note": "one id per pixel; overlaps painted big-to-small so every labelled "
                "finding keeps pixels",
            },
        },
        "image_format": "PNG, 8-bit grey (12-bit sites: 0..4095 in 16-bit PNG)"
        if kind == "cxr"
        else "NIfTI int16 HU, voxel axes (x, y, z), diagonal affine in mm",
        "report_negation": "sentence-level: a sentence with a finding mention and a negation cue is negative "
        "(see medfm.data.phantom.reports.extract_labels)",
        "seed": seed,
        "n": n,
        "size": size,
        "sites": {s.name: s.to_json() for s in sites},
        "generator": "medfm.data.phantom",
    }
