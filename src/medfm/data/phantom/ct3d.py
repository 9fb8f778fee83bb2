"""Chest-CT phantom: Hounsfield units on a voxel grid built from analytic shapes (body with fat and muscle,
lungs, heart, aorta, spine, ribs, sternum, liver) plus findings, then the site's scanner response (noise,
kernel blur, calibration drift, field of view, slice spacing).

Arrays are (D, H, W) = (z, y, x): D runs inferior -> superior, H posterior -> anterior, W patient left ->
right, matching a diagonal (RAS+) affine once written with voxel axes (x, y, z).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from medfm.data.phantom.sites import Site

ORGAN_LABELS = {1: "right_lung", 2: "left_lung", 3: "heart", 4: "spine", 5: "aorta"}
_PAINT_ORDER = ("cardiomegaly", "consolidation", "effusion", "pneumothorax", "nodule")
_FINDING_ID = {"nodule": 1, "effusion": 2, "consolidation": 3, "cardiomegaly": 4, "pneumothorax": 5}
_EFF_DEPTH = {"small": 0.22, "moderate": 0.38, "large": 0.55}  # fraction of lung AP depth
_PTX_MM = {"small": 8.0, "moderate": 14.0, "large": 22.0}
SLICES_REF = 64  # the site's slice spacing applies at 64 slices; more slices are thinner


def ct_spacing(site: Site, size: int) -> tuple[float, float, float]:
    """(sz, sy, sx) in mm."""
    sxy = site.ct_fov_mm / size
    return (round(site.ct_slice_mm * SLICES_REF / size, 4), round(sxy, 4), round(sxy, 4))


def _smooth(r: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    n = ndi.gaussian_filter(r.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def _tube(Z: np.ndarray, Y: np.ndarray, X: np.ndarray, pts: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within `radius` mm of a densely sampled polyline (points (K, 3) as z, y, x)."""
    out = np.zeros(np.broadcast_shapes(Z.shape, Y.shape, X.shape), bool)
    for z, y, x in pts:
        out |= (Z - z) ** 2 + (Y - y) ** 2 + (X - x) ** 2 <= radius**2
    return out


def render_ct(
    rec: dict[str, Any], site: Site, size: int, r: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Render one CT volume: (int16 HU (D, H, W), organ label map, finding label map, measurements)."""
    sz, sy, sx = ct_spacing(site, size)
    n = size
    c = np.arange(n, dtype=np.float32) - n / 2 + 0.5
    Z, Y, X = np.meshgrid(c * sz, c * sy, c * sx, indexing="ij", sparse=True)  # mm from the volume centre
    shift = r.uniform(-8, 8, 3)  # patient positioning
    Z, Y, X = Z - shift[0], Y - shift[1] + 10.0, X - shift[2]
    shape = (n, n, n)
    s = float(rec["_body"])
    a, b = 165.0 * s, 118.0 * s  # body half-width (lateral) and half-depth (AP)

    body_q = (X / a) ** 2 + (Y / b) ** 2
    body = np.broadcast_to(body_q <= 1.0, shape)
    fat_q = (X / (a - 14)) ** 2 + (Y / (b - 12)) ** 2
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = -100.0  # subcutaneous fat
    hu[np.broadcast_to(fat_q <= 1.0, shape)] = 45.0  # muscle / soft tissue

    # Lungs: half-ellipsoids either side of the mediastinum, cut below by the diaphragm domes.
    lx, ly, lz = 0.92 * (a - 20) / 2, 0.9 * (b - 18), 118.0 * s
    lungs: dict[str, np.ndarray] = {}
    for side, sign in (("right", 1.0), ("left", -1.0)):
        cx = sign * (22 + lx)
        q = ((X - cx) / lx) ** 2 + ((Y + 5) / ly) ** 2 + ((Z - 5) / lz) ** 2
        bump = np.clip(1 - ((X - cx) / lx) ** 2 - (Y / ly) ** 2, 0, 1)
        dome = -95 + (12 if side == "right" else 0) + 45 * bump
        lungs[side] = (q <= 1.0) & (Z > dome) & (X * sign > 20)
    lung_hi_z, lung_lo_z = 5 + lz, -95.0

    # Heart: ellipsoid anterior-left; its transverse diameter over the thorax width gives the CTR.
    thorax = 2 * (22 + 2 * lx)
    hx = rec["ctr"] * thorax / 2
    hy, hz = 0.72 * hx, 0.8 * hx
    hcx, hcy, hcz = -hx / 3.0, 25.0 * s, -55.0
    heart = (((X - hcx) / hx) ** 2 + ((Y - hcy) / hy) ** 2 + ((Z - hcz) / hz) ** 2) <= 1.0
    # Aorta: ascending, arch, descending (left of the spine).
    t = np.linspace(0, 1, 24)
    arch = np.stack([45 + 25 * np.sin(np.pi * t), 15 - 75 * t, 5 - 30 * t], 1)  # z, y, x
    asc = np.stack([np.linspace(-30, 45, 10), np.full(10, 15.0), np.full(10, 5.0)], 1)
    desc = np.stack([np.linspace(45, -140, 24), np.full(24, -60.0), np.full(24, -25.0)], 1)
    aorta = _tube(Z, Y, X, np.concatenate([asc, arch, desc]), 13.0 * s)
    heart &= ~aorta
    for k in lungs:
        lungs[k] = lungs[k] & ~heart & ~aorta

    # Spine: vertebral bodies with discs, a spinal canal behind.
    vb = ((X / 19) ** 2 + ((Y + 78) / 17) ** 2) <= 1.0
    spine = np.broadcast_to(vb, shape)
    disc = np.broadcast_to(np.mod(Z + 300, 28.0) < 5.0, shape)
    # Ribs: slanted slabs of a shell just inside the body wall; sternum in front.
    shell = (fat_q <= 1.0) & (((X / (a - 30)) ** 2 + (Y / (b - 28)) ** 2) > 1.0) & (Y < 0.55 * b)
    ribs = shell & (np.mod(Z - 0.35 * Y + 300, 26.0) < 8.0) & (Z < lung_hi_z) & (Z > lung_lo_z - 40)
    sternum = (np.abs(X) < 16) & (Y > b - 32) & (Y < b - 16) & (Z > -90) & (Z < 70)
    # Liver under the right dome, stomach air under the left.
    below = ~(lungs["right"] | lungs["left"]) & (Z < -40)
    liver = np.broadcast_to(body_q <= 0.8, shape) & below & (X > -20) & (Z < -60 + 30 * (X > 40))
    stomach = (((X + 70) / 35) ** 2 + ((Y - 20) / 30) ** 2 + ((Z + 120) / 18) ** 2) <= 1.0

    hu[liver] = 60.0
    hu[stomach & np.broadcast_to(body_q <= 0.8, shape)] = -900.0
    texture = _smooth(r, shape, 1.2)
    lung_any = lungs["right"] | lungs["left"]
    hu[lung_any] = -860.0 + 25.0 * texture[lung_any]
    vessels = _smooth(r, shape, 0.8) > 2.2
    hu[lung_any & vessels] = -150.0
    hu[heart] = 42.0
    hu[aorta] = 48.0
    hu[spine] = 320.0
    hu[spine & disc] = 85.0
    canal = np.broadcast_to(((X / 8) ** 2 + ((Y + 104) / 8) ** 2) <= 1.0, shape)
    hu[canal] = 15.0
    hu[ribs] = 650.0
    hu[sternum] = 420.0

    # --- findings ---------------------------------------------------------------------------------------
    fm: dict[str, np.ndarray] = {}
    zone_z = {"upper": (0.66, 1.0), "mid": (0.33, 0.66), "lower": (0.0, 0.33)}

    def zband(zone: str) -> np.ndarray:
        lo, hi = zone_z[zone]
        z0 = lung_lo_z + 25 + lo * (lung_hi_z - lung_lo_z - 45)
        z1 = lung_lo_z + 25 + hi * (lung_hi_z - lung_lo_z - 45)
        return (Z >= z0) & (Z <= z1)

    if rec["effusion"]:
        sides = ["right", "left"] if rec["effusion_side"] == "bilateral" else [rec["effusion_side"]]
        fluid = np.zeros(shape, bool)
        for side in sides:
            level = -5 - ly + 2 * ly * _EFF_DEPTH[rec["effusion_size"]]
            f = lungs[side] & (Y < level)
            if not f.any():  # coarse grids: at least the most dependent lung voxels
                f = lungs[side] & (Y <= np.broadcast_to(Y, shape)[lungs[side]].min())
            fluid |= f
        hu[fluid] = 12.0
        fm["effusion"] = fluid
    if rec["pneumothorax"]:
        side = rec["pneumothorax_side"]
        m = lungs[side]
        d = ndi.distance_transform_edt(m, sampling=(sz, sy, sx))
        free = m & ~fm.get("effusion", np.zeros(shape, bool))
        rim = free & (d < max(_PTX_MM[rec["pneumothorax_size"]], 1.01 * max(sy, sx))) & (Y > 0)
        if not rim.any():  # coarse grids: at least the most anterior free lung voxels
            rim = free & (Y >= np.broadcast_to(Y, shape)[free].max())
        hu[rim] = -1000.0
        fm["pneumothorax"] = rim
    if rec["consolidation"]:
        side = rec["consolidation_side"]
        region = lungs[side] & zband(rec["consolidation_zone"]) & ~fm.get("effusion", np.zeros(shape, bool))
        if not region.any():
            region = lungs[side]
        idx = np.argwhere(region)
        field = np.zeros(shape, np.float32)
        for _ in range(int(r.integers(2, 5))):
            p = idx[int(r.integers(len(idx)))]
            pz, py, px = (p - n / 2 + 0.5) * np.array([sz, sy, sx]) - [shift[0], shift[1] - 10.0, shift[2]]
            sg = r.uniform(14, 24)
            field += np.exp(-((Z - pz) ** 2 + (Y - py) ** 2 + (X - px) ** 2) / (2 * sg * sg))
        field = field * (0.85 + 0.15 * texture)
        cons = region & (field > 0.5)
        if not cons.any():
            cons = region & (field >= field[region].max() * 0.9)
        hu[cons] = -20.0 + 40.0 * texture[cons]
        fm["consolidation"] = cons
    if rec["nodule"]:
        side = rec["nodule_side"]
        m = lungs[side] & zband(rec["nodule_zone"])
        if not m.any():
            m = lungs[side]
        d = ndi.distance_transform_edt(m, sampling=(sz, sy, sx))
        rad = rec["nodule_size_mm"] / 2
        fx, fy = rec["_nodule_pos"]
        # Stable position across a patient's studies: nearest deep-enough voxel to a patient-specific target.
        sign = 1.0 if side == "right" else -1.0
        tz = lung_lo_z + 25 + (zone_z[rec["nodule_zone"]][0] + fy * 0.33) * (lung_hi_z - lung_lo_z - 45)
        target = np.array([tz, -5 + (fy - 0.5) * ly, sign * (22 + (0.4 + 0.8 * fx) * lx)])
        cand = np.argwhere(d >= min(rad, float(d.max()) * 0.8))
        pos = (cand - n / 2 + 0.5) * np.array([sz, sy, sx]) - [shift[0], shift[1] - 10.0, shift[2]]
        j = int(np.argmin(((pos - target) ** 2).sum(1)))
        pz, py, px = pos[j]
        rr = max(rad, 0.6 * min(sx, sy, sz))
        nod = ((Z - pz) ** 2 + (Y - py) ** 2 + (X - px) ** 2) <= rr**2
        hu[nod] = 35.0
        fm["nodule"] = nod
    if rec["cardiomegaly"]:
        fm["cardiomegaly"] = heart

    # --- scanner ----------------------------------------------------------------------------------------
    hu = ndi.gaussian_filter(hu, site.ct_blur)
    hu += site.ct_hu_offset + site.ct_noise_hu * r.standard_normal(shape).astype(np.float32)
    img = np.clip(np.round(hu), -1024, 3071).astype(np.int16)

    organs = np.zeros(shape, np.uint8)
    organs[spine] = 4
    organs[aorta] = 5
    organs[heart] = 3
    organs[lungs["right"]] = 1
    organs[lungs["left"]] = 2
    findings = np.zeros(shape, np.uint8)
    for name in _PAINT_ORDER:
        if name in fm:
            findings[fm[name]] = _FINDING_ID[name]
    return img, organs, findings, {"spacing_mm": (sz, sy, sx)}
