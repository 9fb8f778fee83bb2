"""Acquisition sites: each differs like a real scanner/department does (intensity curve, noise, PSF, field of
view, burned-in markers, bit depth, and a little in who gets imaged there)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medfm.errors import ConfigError


@dataclass(frozen=True)
class Site:
    """Scanner/department parameters. 2D fields drive the radiograph renderer, ``ct_*`` the CT renderer."""

    name: str
    description: str
    gamma: float = 1.0  # display curve exponent (<1 brighter mid-tones)
    window: tuple[float, float] = (0.0, 1.0)  # display window on the normalised attenuation
    noise: float = 0.012  # quantum-noise std in display units (0..1)
    blur: float = 0.6  # PSF gaussian sigma, pixels at 256 px
    zoom: float = 1.0  # >1: patient closer to detector / smaller field of view
    offset: tuple[float, float] = (0.0, 0.0)  # (dx, dy) shift of the patient, fraction of the image
    markers: tuple[str, ...] = ("L",)  # burned-in text
    marker_corner: str = "tr"  # tl | tr | bl | br
    bit_depth: int = 8  # 8 -> uint8 PNG; 12 -> 0..4095 stored in a 16-bit PNG
    view: str = "PA"
    prevalence: dict[str, float] = field(default_factory=dict)  # multipliers on finding prevalence
    ct_noise_hu: float = 12.0
    ct_blur: float = 0.5  # voxels
    ct_hu_offset: float = 0.0  # calibration drift
    ct_slice_mm: float = 5.0
    ct_fov_mm: float = 400.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_BUILTIN = [
    Site(
        "site_a",
        "department PA, modern flat panel",
        gamma=1.0,
        window=(0.0, 1.0),
        noise=0.010,
        blur=0.5,
        zoom=1.0,
        offset=(0.0, 0.0),
        markers=("L",),
        marker_corner="tr",
        bit_depth=8,
        view="PA",
        ct_noise_hu=10.0,
        ct_blur=0.4,
        ct_hu_offset=0.0,
        ct_slice_mm=4.0,
        ct_fov_mm=400.0,
    ),
    Site(
        "site_b",
        "ICU portable AP, noisy, 12-bit",
        gamma=0.8,
        window=(0.06, 1.05),
        noise=0.035,
        blur=1.1,
        zoom=1.08,
        offset=(0.02, -0.03),
        markers=("PORTABLE", "L"),
        marker_corner="tl",
        bit_depth=12,
        view="AP",
        prevalence={"effusion": 1.4, "consolidation": 1.3, "pneumothorax": 1.3},
        ct_noise_hu=35.0,
        ct_blur=1.0,
        ct_hu_offset=15.0,
        ct_slice_mm=6.0,
        ct_fov_mm=440.0,
    ),
    Site(
        "site_c",
        "older computed radiography, low contrast",
        gamma=1.35,
        window=(-0.08, 1.15),
        noise=0.020,
        blur=0.9,
        zoom=0.9,
        offset=(-0.02, 0.04),
        markers=("R",),
        marker_corner="tl",
        bit_depth=8,
        view="PA",
        prevalence={"nodule": 1.2},
        ct_noise_hu=22.0,
        ct_blur=0.7,
        ct_hu_offset=-12.0,
        ct_slice_mm=5.0,
        ct_fov_mm=360.0,
    ),
]


def make_sites(n: int = 3) -> list[Site]:
    """The first three sites are hand-designed; more are drawn from a fixed generator (seed-independent)."""
    if n < 1:
        raise ConfigError(f"--sites must be >= 1, got {n}")
    sites = list(_BUILTIN[:n])
    for j in range(len(sites), n):
        r = np.random.default_rng([7919, j])
        sites.append(
            Site(
                f"site_{chr(ord('a') + j) if j < 26 else j}",
                "generated site",
                gamma=float(r.uniform(0.75, 1.4)),
                window=(float(r.uniform(-0.1, 0.08)), float(r.uniform(0.95, 1.15))),
                noise=float(r.uniform(0.008, 0.04)),
                blur=float(r.uniform(0.4, 1.3)),
                zoom=float(r.uniform(0.88, 1.1)),
                offset=(float(r.uniform(-0.03, 0.03)), float(r.uniform(-0.04, 0.04))),
                markers=(str(r.choice(["L", "R", "AP", "PA"])),),
                marker_corner=str(r.choice(["tl", "tr"])),
                bit_depth=int(r.choice([8, 12])),
                view=str(r.choice(["PA", "AP"])),
                ct_noise_hu=float(r.uniform(8, 40)),
                ct_blur=float(r.uniform(0.3, 1.1)),
                ct_hu_offset=float(r.uniform(-15, 15)),
                ct_slice_mm=float(r.choice([3.0, 5.0, 6.0])),
                ct_fov_mm=float(r.uniform(350, 450)),
            )
        )
    return sites
