"""Who is imaged: patients, repeat studies, findings and how they evolve, splits.

Everything is a pure function of (seed, case index): case ``i`` belongs to a block of ``BLOCK`` consecutive
cases whose split into patients comes from one RNG, so any case can be planned alone (parallel and resumable
generation) and a patient's studies are always consecutive cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from medfm.data.phantom.sites import Site
from medfm.errors import ConfigError

FINDINGS = ("nodule", "effusion", "consolidation", "cardiomegaly", "pneumothorax")
ZONES = ("upper", "mid", "lower")
BLOCK = 64
# RNG stream tags: one independent stream per purpose.
TAG_BLOCK, TAG_PATIENT, TAG_RENDER, TAG_REPORT = 1, 2, 3, 4
# Split of patients by their global index: every 20 patients give 14 train / 3 val / 3 test, and the first
# three patients already cover all three splits, so even tiny sets have each split.
_SPLIT_PATTERN = "tvstttvtsttttvttsttt"
_SPLIT = {"t": "train", "v": "val", "s": "test"}


def rng(seed: int, tag: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), tag, *[int(i) for i in ids]])


def check_seed(seed: int) -> int:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    return int(seed)


@lru_cache(maxsize=1024)
def _block_studies(seed: int, b: int) -> tuple[int, ...]:
    """Number of studies of each patient in block b (sums to BLOCK)."""
    r = rng(seed, TAG_BLOCK, b)
    counts: list[int] = []
    while sum(counts) < BLOCK:
        counts.append(int(r.choice([1, 2, 3], p=[0.55, 0.3, 0.15])))
    counts[-1] -= sum(counts) - BLOCK
    return tuple(counts)


def locate(seed: int, index: int) -> tuple[int, int, int]:
    """(global patient number, study number of this patient, number of studies of the patient)."""
    b, off = divmod(int(index), BLOCK)
    start = 0
    for j, k in enumerate(_block_studies(seed, b)):
        if off < start + k:
            return b * BLOCK + j, off - start, k
        start += k
    raise AssertionError("unreachable")


def split_of(patient: int) -> str:
    return _SPLIT[_SPLIT_PATTERN[patient % len(_SPLIT_PATTERN)]]


def lobe_of(side: str, zone: str) -> str:
    if side == "right":
        return {"upper": "right upper lobe", "mid": "right middle lobe", "lower": "right lower lobe"}[zone]
    return {"upper": "left upper lobe", "mid": "lingula", "lower": "left lower lobe"}[zone]


@dataclass
class Patient:
    number: int
    patient_id: str
    sex: str
    age0: int
    site: Site
    body: float  # thorax width scale (sex, age, habitus)
    studies: list[dict[str, Any]] = field(default_factory=list)  # per-study findings (see _trajectory)


def _p(base: float, site: Site, name: str) -> float:
    return float(min(0.9, base * site.prevalence.get(name, 1.0)))


def make_patient(seed: int, number: int, n_studies: int, sites: list[Site]) -> Patient:
    r = rng(seed, TAG_PATIENT, number)
    sex = "M" if r.random() < 0.5 else "F"
    age0 = int(r.integers(20, 86))
    site = sites[number % len(sites)]
    body = float((1.0 if sex == "M" else 0.93) * r.uniform(0.94, 1.06) * (1.0 + 0.0006 * (age0 - 50)))
    a = (age0 - 20) / 70.0  # 0 young .. 1 old
    ctr0 = float(r.uniform(0.39, 0.47) + 0.02 * a)

    p_nod = _p(0.10 + 0.30 * a, site, "nodule")
    p_card = _p(0.06 + 0.45 * a**1.5, site, "cardiomegaly")
    p_ptx = _p(0.26 + (0.08 if sex == "M" else 0.0) - 0.14 * a, site, "pneumothorax")
    p_cons = _p(0.24, site, "consolidation")

    nod = r.random() < p_nod
    nod_onset = 0 if r.random() < 0.8 else int(r.integers(0, max(n_studies, 1)))
    nod_size = float(r.uniform(5.0, 22.0))
    nod_growth = 1.0 if r.random() < 0.6 else float(r.uniform(1.08, 1.3))
    nod_side = str(r.choice(["right", "left"]))
    nod_zone = str(r.choice(ZONES))
    nod_pos = (float(r.uniform(0.25, 0.75)), float(r.uniform(0.3, 0.7)))  # (across lung, down the zone)
    card = r.random() < p_card
    card_ctr = float(r.uniform(0.56, 0.66))

    studies: list[dict[str, Any]] = []
    prev: dict[str, Any] | None = None
    for k in range(n_studies):
        f: dict[str, Any] = {"age": min(90, age0 + k)}
        # Persistent findings.
        f["nodule"] = int(nod and k >= nod_onset)
        if f["nodule"]:
            f["nodule_size_mm"] = round(min(30.0, nod_size * nod_growth ** (k - nod_onset)), 1)
            f.update(
                nodule_side=nod_side,
                nodule_zone=nod_zone,
                nodule_lobe=lobe_of(nod_side, nod_zone),
                nodule_pos=nod_pos,
            )
        f["cardiomegaly"] = int(card)
        f["ctr"] = round(min(0.7, (card_ctr if card else ctr0) + 0.005 * k), 3)
        # Acute findings: persist with some probability, else appear afresh.
        p_eff = _p(0.14 + 0.12 * a + (0.15 if card else 0.0), site, "effusion")
        if prev and prev["effusion"] and r.random() < 0.6:
            f.update({k2: prev[k2] for k2 in ("effusion", "effusion_side", "effusion_size")})
        else:
            f["effusion"] = int(r.random() < p_eff)
            if f["effusion"]:
                f["effusion_side"] = str(r.choice(["right", "left", "bilateral"], p=[0.4, 0.35, 0.25]))
                f["effusion_size"] = str(r.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))
        if prev and prev["consolidation"] and r.random() < 0.4:
            f.update(
                {
                    k2: prev[k2]
                    for k2 in (
                        "consolidation",
                        "consolidation_side",
                        "consolidation_zone",
                        "consolidation_lobe",
                    )
                }
            )
        else:
            f["consolidation"] = int(r.random() < p_cons)
            if f["consolidation"]:
                side = str(r.choice(["right", "left"]))
                f.update(consolidation_side=side, consolidation_zone=str(r.choice(ZONES)))
        if prev and prev["pneumothorax"] and r.random() < 0.3:
            f.update({k2: prev[k2] for k2 in ("pneumothorax", "pneumothorax_side", "pneumothorax_size")})
        else:
            f["pneumothorax"] = int(r.random() < p_ptx)
            if f["pneumothorax"]:
                f["pneumothorax_side"] = str(r.choice(["right", "left"]))
                f["pneumothorax_size"] = str(r.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))
        _untangle(f, r)
        if f["consolidation"]:
            f["consolidation_lobe"] = lobe_of(f["consolidation_side"], f["consolidation_zone"])
        studies.append(f)
        prev = f
    return Patient(number, f"PT{number:07d}", sex, age0, site, body, studies)


def _untangle(f: dict[str, Any], r: np.random.Generator) -> None:
    """Keep findings from hiding each other so every labelled finding stays visible and has mask pixels."""
    eff_sides = {"right", "left"} if f.get("effusion_side") == "bilateral" else {f.get("effusion_side")}
    if f["consolidation"]:
        # An effusion covers the lower zone; a nodule inside consolidation would be invisible.
        bad = set()
        if f["effusion"] and f["consolidation_side"] in eff_sides:
            bad.add("lower")
        if f["nodule"] and f["consolidation_side"] == f["nodule_side"]:
            bad.add(f["nodule_zone"])
        if f["consolidation_zone"] in bad:
            ok = [z for z in ZONES if z not in bad]
            f["consolidation_zone"] = str(r.choice(ok))
    if f["pneumothorax"] and f["effusion"] and f["pneumothorax_side"] in eff_sides:
        f["effusion_size"] = "small"  # small effusion sits below the apical/lateral pneumothorax rim


def case_id(kind: str, index: int) -> str:
    return f"{kind}_{index:07d}"


def plan_case(kind: str, index: int, seed: int, sites: list[Site]) -> dict[str, Any]:
    """The public record of one case (everything but pixels and the report): labels and attributes."""
    number, k, n_studies = locate(seed, index)
    pat = make_patient(seed, number, n_studies, sites)
    f = pat.studies[k]
    rec: dict[str, Any] = {
        "case_id": case_id(kind, index),
        "patient_id": pat.patient_id,
        "study_id": f"{pat.patient_id}-{k + 1}",
        "study_number": k + 1,
        "site": pat.site.name,
        "sex": pat.sex,
        "age": f["age"],
        "split": split_of(number),
        "view": pat.site.view if kind == "cxr" else "axial",
    }
    for name in FINDINGS:
        rec[name] = int(f[name])
    rec.update(
        nodule_size_mm=f.get("nodule_size_mm", 0.0),
        nodule_side=f.get("nodule_side", ""),
        nodule_zone=f.get("nodule_zone", ""),
        nodule_lobe=f.get("nodule_lobe", ""),
        effusion_side=f.get("effusion_side", ""),
        effusion_size=f.get("effusion_size", ""),
        consolidation_side=f.get("consolidation_side", ""),
        consolidation_zone=f.get("consolidation_zone", ""),
        consolidation_lobe=f.get("consolidation_lobe", ""),
        pneumothorax_side=f.get("pneumothorax_side", ""),
        pneumothorax_size=f.get("pneumothorax_size", ""),
        ctr=f["ctr"],
    )
    rec["_body"] = pat.body
    rec["_nodule_pos"] = f.get("nodule_pos", (0.5, 0.5))
    rec["_prior"] = {n: int(pat.studies[k - 1][n]) for n in FINDINGS} if k > 0 else None
    if k > 0 and f["nodule"] and pat.studies[k - 1]["nodule"]:
        rec["_prior_nodule_mm"] = pat.studies[k - 1]["nodule_size_mm"]
    return rec
