"""Chest-radiograph phantom: projected attenuation of body, lungs, heart, bones and findings, then the site's
detector response (window/gamma, PSF, noise, burned-in markers, bit depth).

Geometry lives in a canonical frame (x right on the image, y down, thorax spans about [-1, 1]); one affine
(site zoom/offset, patient tilt) maps it to pixels. Everything is vectorised: PIL rasterises polygons and
polylines, scipy does blurs and distance transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from medfm.data.phantom.cohort import FINDINGS
from medfm.data.phantom.sites import Site

ORGAN_LABELS = {1: "right_lung", 2: "left_lung", 3: "heart", 4: "spine"}
FINDING_LABELS = {i + 1: n for i, n in enumerate(FINDINGS)}
FOV_MM = 400.0  # canonical [-1, 1] spans 400 mm at zoom 1
# Paint order of finding masks: big first, small last, so each finding keeps its pixels.
_PAINT_ORDER = ("cardiomegaly", "consolidation", "effusion", "pneumothorax", "nodule")
_EFF_HEIGHT = {"small": 0.08, "moderate": 0.2, "large": 0.34}  # fraction of lung height
_PTX_WIDTH = {"small": 0.05, "moderate": 0.085, "large": 0.13}  # canonical rim width


@dataclass
class Frame:
    """Canonical <-> pixel mapping for one image."""

    size: int
    scale: float  # pixels per canonical unit
    cx: float
    cy: float
    cos: float
    sin: float

    def px(self, pts: np.ndarray) -> list[tuple[float, float]]:
        x, y = pts[:, 0], pts[:, 1]
        u = (x * self.cos - y * self.sin) * self.scale + self.cx
        v = (x * self.sin + y * self.cos) * self.scale + self.cy
        return list(zip(u.tolist(), v.tolist()))

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        v, u = np.mgrid[0 : self.size, 0 : self.size].astype(np.float32)
        u = (u + 0.5 - self.cx) / self.scale
        v = (v + 0.5 - self.cy) / self.scale
        return u * self.cos + v * self.sin, -u * self.sin + v * self.cos


def _poly(fr: Frame, pts: np.ndarray) -> np.ndarray:
    im = Image.new("L", (fr.size, fr.size), 0)
    ImageDraw.Draw(im).polygon(fr.px(pts), fill=1)
    return np.asarray(im, dtype=bool)


def _lines(
    fr: Frame, curves: list[np.ndarray], width: float, values: list[float] | None = None
) -> np.ndarray:
    im = Image.new("F", (fr.size, fr.size), 0.0)
    d = ImageDraw.Draw(im)
    w = max(1, int(round(width * fr.scale)))
    for i, c in enumerate(curves):
        d.line(fr.px(c), fill=float(values[i]) if values else 1.0, width=w, joint="curve")
    return np.asarray(im, dtype=np.float32)


def _ellipse(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Projected thickness of an ellipsoid: sqrt(1 - r^2) inside, 0 outside."""
    q = 1.0 - ((X - cx) / rx) ** 2 - ((Y - cy) / ry) ** 2
    return np.sqrt(np.clip(q, 0.0, None))


def _smooth_noise(r: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    n = ndi.gaussian_filter(r.standard_normal((size, size)).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def lung_outline(side: int, W: float, dome: float, cp: float, apex: float = -0.80) -> np.ndarray:
    """Polygon of one lung (side=-1 right lung on image left, +1 left lung) in canonical coordinates."""
    xc, rx, ry = 0.27, 0.95 * W - 0.27, cp - apex
    th = np.linspace(0.0, np.pi / 2, 24)
    lateral = np.stack([xc + rx * np.cos(th), cp - ry * np.sin(th)], 1)  # costophrenic -> apex
    top = np.array([[0.19, apex + 0.02], [0.14, apex + 0.12]])
    med_x = 0.115 if side < 0 else 0.105
    medial = np.array([[med_x, -0.5], [med_x - 0.01, -0.1], [med_x + 0.01, 0.2], [med_x + 0.02, dome + 0.06]])
    t = np.linspace(0.0, 1.0, 20)
    dx = med_x + 0.02 + t * (0.95 * W - med_x - 0.02)
    base = dome + 0.06 + t * (cp - dome - 0.06)
    dy = base - (0.10 + 0.02 * W) * np.sin(np.pi * t) ** 0.7 * (1 - t) ** 0.3
    diaphragm = np.stack([dx, dy], 1)
    pts = np.concatenate([lateral, top, medial, diaphragm])
    pts[:, 0] *= side
    return pts


def lateral_x(W: float, y: float, cp: float, apex: float = -0.80) -> float:
    """|x| of the lateral lung wall at height y (canonical)."""
    xc, rx, ry = 0.27, 0.95 * W - 0.27, cp - apex
    s = np.clip((cp - y) / ry, 0.0, 1.0)
    return float(xc + rx * np.sqrt(1 - s**2))


@lru_cache(maxsize=8)
def _font(px: int) -> Any:
    try:
        return ImageFont.load_default(size=px)
    except Exception:  # PIL without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _markers(size: int, site: Site) -> np.ndarray:
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    f = _font(max(7, size // 18))
    y = max(2, size // 40)
    for text in site.markers:
        bbox = d.textbbox((0, 0), text, font=f)
        w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
        x = max(2, size // 40) if site.marker_corner[1] == "l" else size - w - max(2, size // 40)
        yy = y if site.marker_corner[0] == "t" else size - h - y - 2
        d.text((x - bbox[0], yy - bbox[1]), text, fill=255, font=f)
        y += h + max(2, size // 60)
    return np.asarray(im, dtype=np.float32) / 255.0


def render_cxr(
    rec: dict[str, Any], site: Site, size: int, r: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Render one radiograph. Returns (display image float32 in [0,1], organ label map, finding label map,
    measurements)."""
    S = size
    tilt = float(r.uniform(-2.5, 2.5)) * np.pi / 180
    jitter = r.uniform(-0.015, 0.015, 2)
    scale = 0.5 * S * site.zoom
    fr = Frame(
        S,
        scale,
        S * (0.5 + site.offset[0] + jitter[0]),
        S * (0.5 + site.offset[1] + jitter[1]),
        float(np.cos(tilt)),
        float(np.sin(tilt)),
    )
    X, Y = fr.grid()
    body_s = float(rec["_body"])
    W = 0.80 * body_s  # thorax half-width (lateral lung wall at its widest)
    insp = float(r.uniform(-0.04, 0.04))  # depth of inspiration moves the domes
    dome_r, cp_r = 0.33 + insp, 0.52 + insp
    dome_l, cp_l = dome_r + 0.05, cp_r + 0.04

    # --- organs -----------------------------------------------------------------------------------------
    lung_poly = {
        "right": _poly(fr, lung_outline(-1, W, dome_r, cp_r)),
        "left": _poly(fr, lung_outline(+1, W, dome_l, cp_l)),
    }
    thorax_w = 2 * 0.95 * W
    hw = rec["ctr"] * thorax_w / 2  # heart half-width so that the CTR matches the record
    # Tilted ellipse (long axis towards the apex, down and to the patient's left) sized so that its
    # horizontal half-extent is hw; it sits on the diaphragm, so its bottom is cut by the domes.
    th, ratio = np.deg2rad(32), 1.3
    hb = hw / np.sqrt((ratio * np.cos(th)) ** 2 + np.sin(th) ** 2)
    ha = ratio * hb
    half_h = np.sqrt((ha * np.sin(th)) ** 2 + (hb * np.cos(th)) ** 2)
    hcx, hcy = hw / 3.0, min(dome_l, dome_r) + 0.06 - 0.55 * half_h
    Xr = (X - hcx) * np.cos(th) + (Y - hcy) * np.sin(th)
    Yr = -(X - hcx) * np.sin(th) + (Y - hcy) * np.cos(th)
    heart_t = _ellipse(Xr, Yr, 0.0, 0.0, ha, hb)
    heart = (heart_t > 0) & (Y < max(cp_l, cp_r) - 0.02)
    # Upper mediastinum: aortic knob and pulmonary trunk bulge into the left lung above the heart.
    med_pts = np.array(
        [
            [-0.125, -0.75],
            [0.115, -0.75],
            [0.16, -0.42],
            [0.19, -0.36],
            [0.16, -0.24],
            [0.20, -0.12],
            [0.24, hcy],
            [-0.12, hcy],
        ]
    )
    medi = _poly(fr, med_pts) | heart
    lung = {k: v & ~medi for k, v in lung_poly.items()}
    spine_col = np.clip(1 - (X / 0.075) ** 2, 0, None) ** 0.5 * (Y > -1.2) * (Y < 0.75)

    organs = np.zeros((S, S), np.uint8)
    organs[spine_col > 0] = 4
    organs[heart] = 3
    organs[lung["right"]] = 1
    organs[lung["left"]] = 2

    # --- attenuation map ----------------------------------------------------------------------------------
    Wb = W * 1.2
    body_pts = np.array(
        [
            [-0.2, -1.4],
            [0.2, -1.4],
            [0.22, -0.92],
            [0.55, -0.86],
            [Wb - 0.05, -0.8],
            [Wb + 0.15, -0.66],
            [Wb + 0.18, -0.3],
            [Wb + 0.05, 0.4],
            [Wb - 0.02, 1.4],
        ]
    )
    body_pts = np.concatenate([body_pts, body_pts[::-1] * [-1, 1]])
    body = ndi.gaussian_filter(_poly(fr, body_pts).astype(np.float32), 0.006 * S)
    A = 0.55 + 0.45 * np.sqrt(np.clip(1 - (X / (Wb + 0.25)) ** 2, 0, None))
    A = A * body
    # Arms beside the chest and humeral heads in the upper corners.
    for sx in (-1, 1):
        A += 0.55 * _ellipse(X, Y, sx * (Wb + 0.2), -0.25, 0.13, 0.9)
        A += 0.45 * _ellipse(X, Y, sx * (Wb + 0.08), -0.78, 0.13, 0.12)
    # Lungs: air thickness peaks in the middle of each lung, falls at the walls.
    d0 = 0.18 * scale
    t_lung = np.zeros((S, S), np.float32)
    dist = {}
    for k, m in lung_poly.items():
        dist[k] = ndi.distance_transform_edt(m).astype(np.float32)
        t_lung += np.sqrt(np.clip(dist[k] / d0, 0, 1)) * m
    t_lung = ndi.gaussian_filter(t_lung, 0.004 * S + 0.3)
    heart_soft = ndi.gaussian_filter(np.maximum(np.clip(heart_t * 2.5, 0, 1), medi), 0.006 * S + 0.3)
    A -= 0.62 * t_lung * (1 - 0.97 * heart_soft)
    A += 0.08 * heart_t
    # Hila.
    for sx in (-1, 1):
        A += 0.12 * _ellipse(X, Y, sx * 0.17, -0.08, 0.07, 0.12)
    # Gastric bubble under the left dome.
    A -= 0.25 * _ellipse(X, Y, 0.38, cp_l + 0.06, 0.10, 0.05)
    if rec["sex"] == "F":  # breast shadows over the lower zones
        for sx in (-1, 1):
            A += 0.16 * _ellipse(X, Y, sx * 0.5 * W, 0.5, 0.36, 0.26) * (Y > 0.25)
    # Vessels: tapering branches from the hila, fading to the periphery.
    vessels = _vessels(fr, r, W, X, Y)
    lung_any = (lung_poly["right"] | lung_poly["left"]).astype(np.float32)
    texture = _smooth_noise(r, S, 0.012 * S)
    paren = 0.10 * vessels + 0.02 * texture

    # --- findings (modify attenuation + paint masks) --------------------------------------------------------
    fmasks: dict[str, np.ndarray] = {}
    apex = -0.80
    if rec["pneumothorax"]:
        side = rec["pneumothorax_side"]
        sx = -1 if side == "right" else 1
        w = _PTX_WIDTH[rec["pneumothorax_size"]] * scale
        lat = (X * sx) > 0.3
        rim = lung_poly[side] & (dist[side] < w) & (lat | (Y < -0.45)) & (Y < 0.1)
        rim &= ~heart
        inner = ndi.binary_dilation(rim, iterations=max(1, S // 200)) & ~rim & lung_poly[side]
        paren = paren * (1 - rim)
        A -= 0.14 * ndi.gaussian_filter(rim.astype(np.float32), 0.5)
        A += 0.16 * ndi.gaussian_filter(inner.astype(np.float32), 0.4)
        fmasks["pneumothorax"] = rim
    A += paren * lung_any
    if rec["effusion"]:
        sides = ["right", "left"] if rec["effusion_side"] == "bilateral" else [rec["effusion_side"]]
        fluid = np.zeros((S, S), bool)
        for side in sides:
            sx = -1 if side == "right" else 1
            cp = cp_r if side == "right" else cp_l
            dome = dome_r if side == "right" else dome_l
            h = _EFF_HEIGHT[rec["effusion_size"]] * (cp - apex)
            lateral = np.clip((X * sx - 0.1) / (0.95 * W - 0.1), 0, 1)
            # Meniscus: the fluid climbs higher at the lateral wall.
            top = cp - (cp - dome + h) * (0.35 + 0.65 * lateral**1.2)
            fluid |= lung_poly[side] & (Y > top)
        fluid &= ~heart
        soft = ndi.gaussian_filter(fluid.astype(np.float32), 0.006 * S + 0.3)
        A += soft * (0.62 * t_lung + 0.06)
        fmasks["effusion"] = fluid
    if rec["consolidation"]:
        cons, field = _consolidation(rec, lung, dist, r, X, Y, scale, apex, dome_r, dome_l)
        A += field * (0.6 * t_lung + 0.05)
        fmasks["consolidation"] = cons
    if rec["nodule"]:
        nod, prof = _nodule(rec, lung, X, Y, fr, apex, dome_r, dome_l)
        A += 0.38 * prof
        fmasks["nodule"] = nod
    if rec["cardiomegaly"]:
        fmasks["cardiomegaly"] = heart

    # --- bones ----------------------------------------------------------------------------------------------
    A += _bones(fr, r, W, X, Y, cp_r)

    # --- detector -------------------------------------------------------------------------------------------
    D = np.clip(A / 1.55, 0, None)
    lo, hi = site.window
    D = np.clip((D - lo) / (hi - lo), 0, 1) ** site.gamma
    D = ndi.gaussian_filter(D, site.blur * S / 256)
    D = D + site.noise * (0.5 + 0.8 * D) * r.standard_normal((S, S)).astype(np.float32)
    D = np.maximum(D, _markers(S, site))
    D = np.clip(D, 0, 1).astype(np.float32)

    findings = np.zeros((S, S), np.uint8)
    for name in _PAINT_ORDER:
        if name in fmasks:
            findings[fmasks[name]] = FINDINGS.index(name) + 1
    meas = {"spacing_mm": round(FOV_MM / (S * site.zoom), 4)}
    return D, organs, findings, meas


def _vessels(fr: Frame, r: np.random.Generator, W: float, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    curves, vals = [], []
    for sx in (-1, 1):
        for _ in range(18):
            ang = r.uniform(-1.25, 1.3)  # radians from horizontal-outward, negative = upward
            length = r.uniform(0.25, 0.6)
            t = np.linspace(0, 1, 6)[:, None]
            bend = r.uniform(-0.25, 0.25)
            a = ang + bend * t[:, 0]
            rad = length * t[:, 0]
            pts = np.stack([sx * (0.17 + rad * np.cos(a)), -0.08 + rad * np.sin(a)], 1)
            curves.append(pts)
            vals.append(float(r.uniform(0.6, 1.0)))
    v = _lines(fr, curves, 0.012, vals)
    v = ndi.gaussian_filter(v, 0.004 * fr.size + 0.3)
    hd = np.sqrt((np.abs(X) - 0.17) ** 2 + (Y + 0.08) ** 2)
    return v * np.clip(1.1 - hd / 0.75, 0, 1)


def _bones(
    fr: Frame, r: np.random.Generator, W: float, X: np.ndarray, Y: np.ndarray, cp: float
) -> np.ndarray:
    S = fr.size
    # Spine: vertebral bodies with darker disc spaces, pedicles as bright ovals.
    period = 0.085
    ym = np.mod(Y + 1.0, period) - period / 2
    col = np.sqrt(np.clip(1 - (X / 0.07) ** 2, 0, None))
    bones = 0.12 * col * (0.75 + 0.25 * (np.abs(ym) < period * 0.38))
    ped = np.clip(1 - ((np.abs(X) - 0.047) / 0.016) ** 2 - (ym / 0.022) ** 2, 0, None) ** 0.5
    bones += 0.06 * ped
    # Ribs: each a posterior arc (spine -> lateral wall) continuing as a fainter anterior arc.
    post, ant = [], []
    n_ribs = 10
    for i in range(n_ribs):
        y0 = -0.86 + i * 0.128 + r.uniform(-0.01, 0.01)
        for sx in (-1, 1):
            reach = lateral_x(W, y0 + 0.1, cp) + 0.03 - 0.07
            t = np.linspace(0, 1, 14)
            x = 0.07 + t * reach
            y = y0 - 0.07 * np.sin(np.pi * t * 0.75) + 0.20 * t**3
            post.append(np.stack([sx * x, y], 1))
            ta = np.linspace(0, 1, 10)
            xa = x[-1] - ta * (x[-1] - 0.32)
            ya = y[-1] + 0.06 * np.sin(np.pi * ta * 0.5) + 0.22 * ta
            ant.append(np.stack([sx * xa, ya], 1))
    outer = _lines(fr, post, 0.042)
    inner = _lines(fr, post, 0.024)
    bones += 0.08 * outer + 0.05 * (outer - inner)  # brighter cortex at the rib edges
    bones += 0.045 * _lines(fr, ant, 0.05)
    # Clavicles (S-shaped) and scapular edges.
    cl = []
    for sx in (-1, 1):
        t = np.linspace(0, 1, 16)
        cl.append(np.stack([sx * (0.1 + 0.6 * t), -0.62 - 0.14 * t + 0.03 * np.sin(2 * np.pi * t)], 1))
    bones += 0.2 * _lines(fr, cl, 0.05)
    for sx in (-1, 1):
        bones += 0.06 * _ellipse(X, Y, sx * (0.95 * W + 0.02), -0.45, 0.14, 0.35)
    return ndi.gaussian_filter(bones, 0.003 * S + 0.3)


def _zone_y(zone: str, frac: float, apex: float, dome: float) -> float:
    i = ("upper", "mid", "lower").index(zone)
    return apex + 0.05 + (i + frac) / 3.0 * (dome + 0.05 - apex)


def _row_point(mask: np.ndarray, fr: Frame, y: float, side: str, fx: float) -> tuple[float, float]:
    """Canonical point at height y, a fraction fx from the medial to the lateral edge of the lung mask."""
    row = int(np.clip(fr.px(np.array([[0.0, y]]))[0][1], 0, fr.size - 1))
    cols = np.nonzero(mask[row])[0]
    if len(cols) == 0:  # fallback: the mask centroid
        rr, cc = np.nonzero(mask)
        row, cols = int(np.median(rr)), cc[rr == int(np.median(rr))]
        if len(cols) == 0:
            cols = cc
    lo, hi = cols.min(), cols.max()
    c = hi - fx * (hi - lo) if side == "right" else lo + fx * (hi - lo)
    # back to canonical (inverse of Frame.px)
    u, v = (c + 0.5 - fr.cx) / fr.scale, (row + 0.5 - fr.cy) / fr.scale
    return u * fr.cos + v * fr.sin, -u * fr.sin + v * fr.cos


def _nodule(
    rec: dict[str, Any],
    lung: dict[str, np.ndarray],
    X: np.ndarray,
    Y: np.ndarray,
    fr: Frame,
    apex: float,
    dome_r: float,
    dome_l: float,
) -> tuple[np.ndarray, np.ndarray]:
    side = rec["nodule_side"]
    fx, fy = rec["_nodule_pos"]
    y = _zone_y(rec["nodule_zone"], fy, apex, dome_r if side == "right" else dome_l)
    cx, cy = _row_point(lung[side], fr, y, side, fx)
    rad = rec["nodule_size_mm"] / 2 / (FOV_MM / 2)
    rad_px_min = 0.8 / fr.scale  # at least the centre pixel at tiny image sizes
    prof = _ellipse(X, Y, cx, cy, max(rad, rad_px_min), max(rad, rad_px_min))
    mask = prof > 0
    if not mask.any():
        mask[tuple(np.unravel_index(np.argmax(prof + 1 - np.hypot(X - cx, Y - cy)), prof.shape))] = True
    return mask, prof


def _consolidation(
    rec: dict[str, Any],
    lung: dict[str, np.ndarray],
    dist: dict[str, np.ndarray],
    r: np.random.Generator,
    X: np.ndarray,
    Y: np.ndarray,
    scale: float,
    apex: float,
    dome_r: float,
    dome_l: float,
) -> tuple[np.ndarray, np.ndarray]:
    side, zone = rec["consolidation_side"], rec["consolidation_zone"]
    dome = dome_r if side == "right" else dome_l
    y_lo, y_hi = _zone_y(zone, 0.0, apex, dome), _zone_y(zone, 1.0, apex, dome)
    region = lung[side] & (Y >= y_lo) & (Y <= y_hi)
    if not region.any():
        region = lung[side]
    rr, cc = np.nonzero(region)
    field = np.zeros(X.shape, np.float32)
    for _ in range(int(r.integers(3, 7))):
        j = int(r.integers(len(rr)))
        cx, cy = X[rr[j], cc[j]], Y[rr[j], cc[j]]
        s = r.uniform(0.05, 0.09)
        field += np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * s * s)).astype(np.float32)
    field = np.clip(field, 0, 1) * (0.8 + 0.2 * _smooth_noise(r, X.shape[0], 0.01 * X.shape[0]))
    field = np.clip(field, 0, 1) * lung[side]
    mask = field > 0.45
    if not mask.any():
        mask = field >= field.max() * 0.9
    return mask, field
