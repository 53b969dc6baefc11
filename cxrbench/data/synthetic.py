"""Seeded, procedurally drawn frontal (PA) chest radiographs with known findings and masks.

A phantom is drawn in normalised coordinates ``u`` (left -> right) and ``v`` (top -> bottom), both in
[-1, 1], then rasterised at the requested size, so one seed gives the same anatomy at every size.
Radiological convention: the patient's left is the image's right, so the heart bulges to the right
of the image centre. Bright = dense (bone, heart, fluid), dark = air (lungs, pneumothorax).

Each seed feeds independent random streams for the anatomy, the texture/noise and each finding, so
adding a finding changes nothing else: ``make_phantom(seed=s)`` and
``make_phantom(seed=s, findings=["Nodule"])`` differ only around the nodule (a paired, counterfactual
example for explanation metrics). Cardiomegaly changes the heart and, with it, the lung outline.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from cxrbench.labels import NIH_FINDINGS, NO_FINDING, canonical_finding

__all__ = ["DEFAULT_PREVALENCE", "SUPPORTED_FINDINGS", "Phantom", "make_phantom", "make_phantom_set",
           "write_phantom_set"]

#: Findings a phantom can show, in NIH order.
SUPPORTED_FINDINGS: tuple[str, ...] = ("Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax")

#: Per-finding probability used by :func:`make_phantom_set` (about 40 % of phantoms show no finding).
DEFAULT_PREVALENCE: dict[str, float] = {
    "Cardiomegaly": 0.25, "Effusion": 0.25, "Mass": 0.10, "Nodule": 0.15, "Pneumothorax": 0.10,
}

_MIN_SIZE = 32
_NORMAL_CTR = (0.41, 0.48)     # cardiothoracic ratio drawn for a normal heart
_ENLARGED_CTR = (0.56, 0.66)   # ... and for Cardiomegaly
_NODULE_RADIUS = (0.03, 0.055)  # normalised units (half the image side = 1): ~4-7 px at 256 px
_MASS_RADIUS = (0.08, 0.12)


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic radiograph and its ground truth.

    Attributes
    ----------
    image : (H, W) float32 in [0, 1]; bright = dense.
    lung_mask : (H, W) bool, the anatomical lung fields (heart and mediastinum excluded; an effusion or
        pneumothorax lies inside it).
    heart_mask : (H, W) bool, the cardiac silhouette above the diaphragm.
    lesion_masks : finding name -> (H, W) bool, one entry per drawn finding (Cardiomegaly: the heart).
    labels : 0/1 for each of :data:`cxrbench.labels.NIH_FINDINGS`.
    ctr : cardiothoracic ratio (widest heart / widest inner thorax, measured on the masks).
    seed : the seed that reproduces it with :func:`make_phantom`.
    """

    image: np.ndarray
    lung_mask: np.ndarray
    heart_mask: np.ndarray
    lesion_masks: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    ctr: float = 0.0
    seed: int = 0

    @property
    def findings(self) -> tuple[str, ...]:
        """The findings present, in NIH order."""
        return tuple(f for f in NIH_FINDINGS if self.labels.get(f, 0))

    @property
    def finding_labels(self) -> str:
        """NIH-style label string: ``"Effusion|Nodule"`` or ``"No Finding"``."""
        return "|".join(self.findings) or NO_FINDING


@dataclass(frozen=True)
class _Anatomy:
    """Size-independent shape parameters in normalised units; index 0 = image left (patient right)."""

    shift: float                        # horizontal offset of the midline
    lung_top: tuple[float, float]       # apex level
    lung_half: tuple[float, float]      # lateral lung edge distance from the midline
    dome_top: tuple[float, float]       # highest point of each hemidiaphragm
    dome_depth: tuple[float, float]     # costophrenic angle lies this far below the dome top
    heart_axes: tuple[float, float]     # heart ellipse semi-axes at scale 1 (long, short)
    heart_tilt: float                   # radians, long axis pointing to the image lower right
    ctr: float                          # target cardiothoracic ratio of the normal heart
    rib_gap: float                      # spacing of the posterior ribs
    body_half: float                    # torso half width
    bubble: tuple[float, float, float]  # gastric air under the left dome: (u offset, depth, radius)

    def dome(self, u: np.ndarray) -> np.ndarray:
        """Diaphragm level at each ``u``: each side's dome, lowest at its costophrenic angle."""
        out = np.empty_like(u)
        for i, s in enumerate((-1, 1)):
            a = s * (u - self.shift)
            peak = 0.5 * self.lung_half[i]
            rel = (a - peak) / (self.lung_half[i] - peak)
            level = self.dome_top[i] + self.dome_depth[i] * rel ** 2 * np.where(rel < 0, 0.4, 1.0)
            sel = a >= 0 if s == 1 else a > 0
            out[sel] = level[sel]
        return out

    def lung_shape(self, u: np.ndarray, v: np.ndarray, s: int) -> np.ndarray:
        """Outline (bool) of lung ``s`` (-1 image left, 1 image right) before heart/mediastinum are cut out."""
        i = (s + 1) // 2
        a = s * (u - self.shift)
        top, half = self.lung_top[i], self.lung_half[i]
        t = (v - top) / (self.dome_top[i] + self.dome_depth[i] - top)
        grow = np.sqrt(np.clip(1.0 - (1.0 - np.clip(t / 0.75, 0.0, 1.0)) ** 2, 0.0, 1.0))  # rounded apex
        apex = 0.42 * half
        return (t >= 0) & (a <= apex + (half - apex) * grow) & (a >= apex - (apex - 0.02) * grow) & (v <= self.dome(u))

    def heart(self, u: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        """Cardiac silhouette (bool) with semi-axes times ``scale``; its lower part hides under the diaphragm."""
        A, B = self.heart_axes[0] * scale, self.heart_axes[1] * scale
        half_w = np.hypot(A * np.cos(self.heart_tilt), B * np.sin(self.heart_tilt))
        du = u - (self.shift + 0.3 * half_w)                      # two thirds of it left of the patient's midline
        dv = (v - (min(self.dome_top) + 0.02 - 0.1 * B)) / 1.25
        c, sn = np.cos(self.heart_tilt), np.sin(self.heart_tilt)
        return (((du * c + dv * sn) / A) ** 2 + ((dv * c - du * sn) / B) ** 2 <= 1.0) & (v <= self.dome(u))

    def mediastinum(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Superior mediastinum widening downwards, plus the aortic knob (bool)."""
        a = u - self.shift
        band = np.abs(a) <= 0.075 + 0.05 * np.clip((v + 0.3) / 0.6, 0.0, 1.0)
        return band | ((a - 0.09) ** 2 + ((v + 0.38) / 1.3) ** 2 <= 0.065 ** 2)


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    top, half, dome = rng.uniform(-0.84, -0.74), rng.uniform(0.74, 0.84), rng.uniform(0.44, 0.56)
    return _Anatomy(
        shift=rng.uniform(-0.04, 0.04),
        lung_top=(top + rng.uniform(-0.03, 0.03), top + rng.uniform(-0.03, 0.03)),
        lung_half=(half + rng.uniform(-0.03, 0.03), half + rng.uniform(-0.03, 0.03)),
        dome_top=(dome, dome + rng.uniform(0.02, 0.08)),  # the right hemidiaphragm sits higher
        dome_depth=(rng.uniform(0.12, 0.20), rng.uniform(0.12, 0.20)),
        heart_axes=(rng.uniform(0.36, 0.42), rng.uniform(0.32, 0.36)),
        heart_tilt=rng.uniform(0.35, 0.65),
        ctr=rng.uniform(*_NORMAL_CTR),
        rib_gap=rng.uniform(0.105, 0.125),
        body_half=rng.uniform(1.03, 1.13),
        bubble=(rng.uniform(0.25, 0.45), rng.uniform(0.03, 0.07), rng.uniform(0.0, 0.1)),
    )


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in normalised units: u (1, W) and v (H, 1), float32 (they broadcast to (H, W))."""
    c = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    return c[None, :], c[:, None]


def _width(mask: np.ndarray) -> int:
    """Widest horizontal extent in pixels (leftmost to rightmost, inclusive) over all rows of a mask."""
    rows = mask[mask.any(axis=1)]
    if rows.size == 0:
        return 0
    return int((rows.shape[1] - rows[:, ::-1].argmax(axis=1) - rows.argmax(axis=1)).max())


def _fit_heart(anat: _Anatomy, u: np.ndarray, v: np.ndarray, thorax_px: int,
               target: float) -> tuple[np.ndarray, float]:
    """Scale the heart until its measured CTR is near ``target`` and on the same side of 0.5.

    Returns the heart mask and its scale. On coarse grids a pixel is worth several hundredths of CTR,
    so the last steps nudge the scale until normal stays < 0.5 and enlarged > 0.5.
    """
    scale = 1.0
    for _ in range(4):
        heart = anat.heart(u, v, scale)
        measured = _width(heart) / thorax_px
        if measured == 0 or abs(measured - target) < 0.01:
            break
        scale *= target / measured
    for _ in range(10):
        heart = anat.heart(u, v, scale)
        if (_width(heart) / thorax_px < 0.5) == (target < 0.5):
            break
        scale *= 0.98 if target < 0.5 else 1.02
    return heart, scale


def _band(d: np.ndarray, half: np.ndarray | float) -> np.ndarray:
    """Bone band profile across signed distance ``d`` from its centre line: cortex brighter than marrow."""
    x2 = (d / half) ** 2
    return np.where(x2 < 1.0, 0.7 + 0.3 * x2 * x2, 0.0)


def _rib_family(v: np.ndarray, alpha: float, beta: np.ndarray, gamma: np.ndarray, half0: float,
                n: int = 10) -> np.ndarray:
    """Band of the nearest of ``n`` curves ``centre_k = alpha k^2 + beta k + gamma`` (k = 0..n-1).

    ``beta``, ``gamma``: (1, W) per column; ``v``: (H, 1). Solving the quadratic for k finds the
    nearest rib without a loop over ribs. Returns (H, W).
    """
    k_cont = (-beta + np.sqrt(np.maximum(beta ** 2 - 4 * alpha * (gamma - v), 0.0))) / (2 * alpha)
    k0 = np.clip(np.floor(k_cont), 0, n - 1)
    k1 = np.minimum(k0 + 1, n - 1)
    d0 = v - (alpha * k0 ** 2 + beta * k0 + gamma)
    d1 = v - (alpha * k1 ** 2 + beta * k1 + gamma)
    use1 = np.abs(d1) < np.abs(d0)
    return _band(np.where(use1, d1, d0), half0 * (1.0 + 0.09 * np.where(use1, k1, k0)))


def _ribs(anat: _Anatomy, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior and anterior rib layers, each (H, W) in [0, 1].

    Posterior rib k: ``top + gap k (1 + 0.035 k) + (0.7 - 0.04 k) g(an)``, arching up from the spine and
    down at the chest wall (``an`` = distance from the midline / lung half width). The anterior rib
    leaves the lateral end of its posterior rib and slopes down towards the midline.
    """
    right = u >= anat.shift
    an = (np.abs(u - anat.shift) / np.where(right, anat.lung_half[1], anat.lung_half[0])).astype(np.float32)
    top = (np.where(right, anat.lung_top[1], anat.lung_top[0]) - 0.03).astype(np.float32)
    gap, g = anat.rib_gap, (an - 0.25) ** 2 - 0.0625
    alpha = 0.035 * gap
    post = _rib_family(v, alpha, gap - 0.04 * g, top + 0.7 * g, 0.021)
    post = post * (np.clip((1.25 - an) / 0.2, 0.0, 1.0) * (an > 0.07))
    slope = 0.3 * (1.05 - an) + 0.25 * (1.05 - an) ** 2
    ant = _rib_family(v, alpha, np.full_like(an, gap - 0.02), top + 0.35 + slope, 0.03) * ((an > 0.3) & (an < 1.15))
    return post, ant


def _clavicles(anat: _Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Both clavicles: gently S-shaped bands rising laterally across the lung apices, (H, W) in [0, 1]."""
    bands = []
    for i, s in enumerate((-1, 1)):
        x = (s * (u - anat.shift) - 0.06) / 0.6
        centre = anat.lung_top[i] + 0.06 - 0.13 * x + 0.035 * np.sin(2 * np.pi * x)
        bands.append(_band(v - centre, 0.032 + 0.008 * (1 - x)) * ((x > 0) & (x < 1)))
    return bands[0] + bands[1]


def _spine(anat: _Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vertebral column: bodies with darker disc spaces and paired pedicles, (H, W) in [0, 1.5]."""
    a = u - anat.shift
    bodies = (np.abs(a) <= 0.065) * (0.8 + 0.2 * (np.cos(2 * np.pi * (v + 1.0) / 0.11) > -0.5))
    return bodies + 0.5 * np.exp(-(((np.abs(a) - 0.05) / 0.012) ** 2 + (((v + 1.0) % 0.11 - 0.03) / 0.015) ** 2))


def _vessel_segments(rng: np.random.Generator, anat: _Anatomy, depth: int = 5) -> list[np.ndarray]:
    """Binary vessel trees from both hila; per generation an (N, 4) array of [u0, v0, u1, v1]."""
    side = np.repeat([-1.0, 1.0], 7)
    start_u, start_v = anat.shift + side * rng.uniform(0.12, 0.2, 14), rng.uniform(-0.12, 0.08, 14)
    angle = np.tile(np.linspace(-1.3, 1.3, 7), 2) + rng.uniform(-0.2, 0.2, 14)  # 0 = lateral, > 0 = down
    length = rng.uniform(0.1, 0.16, 14)
    gens = []
    for _ in range(depth):
        end_u, end_v = start_u + side * length * np.cos(angle), start_v + length * np.sin(angle)
        gens.append(np.stack([start_u, start_v, end_u, end_v], axis=1))
        m = len(angle)  # each branch forks in two
        turn = np.concatenate([-rng.uniform(0.2, 0.55, m), rng.uniform(0.2, 0.55, m)])
        side, start_u, start_v = np.tile(side, 2), np.tile(end_u, 2), np.tile(end_v, 2)
        angle, length = np.tile(angle, 2) + turn, np.tile(length, 2) * rng.uniform(0.6, 0.85, 2 * m)
    return gens


def _lung_texture(rng: np.random.Generator, anat: _Anatomy, size: int) -> np.ndarray:
    """Vessel markings branching and thinning out from the hila, (H, W) float32 in [0, 1.5]."""
    px = size / 2.0
    canvases = np.zeros((2, size * size), np.float32)  # thick trunks, thin branches
    for g, seg in enumerate(_vessel_segments(rng, anat)):
        lengths = np.hypot(seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1]) * px
        n = max(2, int(np.ceil(lengths.max() * 2)))
        t = np.linspace(0.0, 1.0, n)[None, :]
        cols = np.floor((seg[:, :1] + t * (seg[:, 2:3] - seg[:, :1]) + 1.0) * px).astype(int).ravel()
        rows = np.floor((seg[:, 1:2] + t * (seg[:, 3:4] - seg[:, 1:2]) + 1.0) * px).astype(int).ravel()
        ok = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
        weight = np.repeat(lengths / (n - 1), n)[ok] * 0.85 ** g   # ~1 per pixel along a line
        canvases[int(g >= 2)] += np.bincount(rows[ok] * size + cols[ok], weights=weight, minlength=size * size)
    sigma = max(0.6, 1.5 * size / 256)
    thick = ndimage.gaussian_filter(canvases[0].reshape(size, size), sigma) * 1.5 * sigma
    return np.minimum(thick + 0.5 * canvases[1].reshape(size, size), 1.5).astype(np.float32)


def _place_disc(rng: np.random.Generator, inside: Callable[[np.ndarray, np.ndarray], np.ndarray], radius: float,
                taken: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Random centre (u, v) whose whole disc of ``radius`` is ``inside`` the lungs and off other lesions."""
    ring = np.linspace(0.0, 2 * np.pi, 16, endpoint=False)
    for _ in range(1000):
        cu, cv = rng.uniform(-0.85, 0.85), rng.uniform(-0.7, 0.55)
        pu = np.append(cu + 1.15 * radius * np.cos(ring), cu)
        pv = np.append(cv + 1.15 * radius * np.sin(ring), cv)
        if inside(pu, pv).all() and all(np.hypot(cu - tu, cv - tv) > radius + tr for tu, tv, tr in taken):
            return cu, cv
    raise RuntimeError(f"could not place a lesion of radius {radius:.3f} inside the lungs")


def _add_round_lesion(img: np.ndarray, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, lung: np.ndarray,
                      inside: Callable[[np.ndarray, np.ndarray], np.ndarray], radii: tuple[float, float],
                      wobble: float, taken: list[tuple[float, float, float]]) -> np.ndarray:
    """Add a bright, slightly lobulated sphere inside the lungs to ``img`` (in place); return its mask."""
    radius = rng.uniform(*radii)
    cu, cv = _place_disc(rng, inside, radius, taken)
    taken.append((cu, cv, radius))
    radius = max(radius, 3.0 / img.shape[0])  # at least 1.5 pixels on small grids
    lobes = 1.0 + wobble * np.sin(3 * np.arctan2(v - cv, u - cu) + rng.uniform(0, 2 * np.pi))
    d = np.hypot(u - cu, v - cv) / (radius * lobes)
    img += rng.uniform(0.3, 0.38) * np.sqrt(np.clip(1.0 - d ** 2, 0.0, 1.0))  # a sphere's thickness
    return (d <= 1.0) & lung


def _add_effusion(img: np.ndarray, rng: np.random.Generator, anat: _Anatomy, u: np.ndarray, v: np.ndarray,
                  lungs: list[np.ndarray], markings: np.ndarray) -> np.ndarray:
    """Fill one lung base with fluid under a meniscus rising towards the chest wall (in place); return its mask."""
    i = int(rng.integers(2))
    a = (2 * i - 1) * (u - anat.shift)
    level = anat.dome_top[i] + 0.3 * anat.dome_depth[i] - rng.uniform(0.05, 0.22)
    surface = level - rng.uniform(0.06, 0.14) * np.clip(a / anat.lung_half[i], 0, 1.2) ** 2
    fluid = lungs[i] & (v >= surface)
    while fluid.sum() < 4 and surface.min() > anat.lung_top[i]:  # an enlarged heart can crowd the base
        surface = surface - 0.05
        fluid = lungs[i] & (v >= surface)
    img += fluid * (0.36 + 0.06 * np.clip((v - surface) / 0.15, 0, 1) - markings)
    return fluid


def _add_pneumothorax(img: np.ndarray, rng: np.random.Generator, anat: _Anatomy, u: np.ndarray, v: np.ndarray,
                      lungs: list[np.ndarray], markings: np.ndarray) -> np.ndarray:
    """Collapse one lung towards its hilar base: a dark rim without markings behind a thin bright
    pleural line (in place); return the rim's mask."""
    i = int(rng.integers(2))
    s, shrink = 2 * i - 1, rng.uniform(0.72, 0.85)
    au, av = anat.shift + s * 0.1, anat.dome_top[i] + 0.05
    collapsed = anat.lung_shape(au + (u - au) / shrink, av + (v - av) / shrink, s)
    rim = lungs[i] & ~collapsed
    pleura = collapsed & ~ndimage.binary_erosion(collapsed) & ndimage.binary_dilation(rim, iterations=2)
    img += 0.04 * (lungs[i] & collapsed) - rim * (markings + 0.06) + 0.3 * pleura
    return rim


def _resolve(findings: Sequence[str]) -> list[str]:
    """Canonical supported finding names in NIH order; ValueError for anything else."""
    names = set()
    for name in findings:
        try:
            canon = canonical_finding(name)
        except KeyError:
            canon = None
        if canon not in SUPPORTED_FINDINGS:
            raise ValueError(f"unsupported finding {name!r}; phantoms support {', '.join(SUPPORTED_FINDINGS)}")
        names.add(canon)
    return [f for f in SUPPORTED_FINDINGS if f in names]


def _checked_request(size: Any, findings: Any, seed: Any) -> list[str]:
    """The canonical names of ``findings``, after checking the arguments of :func:`make_phantom`."""
    if isinstance(findings, str):
        raise TypeError("findings must be a sequence of names such as ['Nodule'], not a single string")
    if not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise ValueError(f"size must be an integer >= {_MIN_SIZE}, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return _resolve(findings)


def _draw_lesions(img: np.ndarray, wanted: Sequence[str], finding_rng: dict, anat: Any,
                  uv: tuple[np.ndarray, np.ndarray], lungs: list[np.ndarray], markings: np.ndarray, heart: np.ndarray,
                  heart_scale: float) -> dict[str, np.ndarray]:
    """Draw the ``wanted`` findings into ``img`` (in place), each from its own stream; their masks."""
    u, v = uv
    lung = lungs[0] | lungs[1]
    lesions: dict[str, np.ndarray] = {}
    taken: list[tuple[float, float, float]] = []

    def inside(pu: np.ndarray, pv: np.ndarray) -> np.ndarray:
        """In a lung, off the heart and mediastinum, and off the hila (where a nodule would hide)."""
        off_hila = np.minimum(np.hypot(pu - anat.shift + 0.17, pv), np.hypot(pu - anat.shift - 0.17, pv)) > 0.12
        return ((anat.lung_shape(pu, pv, -1) | anat.lung_shape(pu, pv, 1)) & ~anat.heart(pu, pv, heart_scale * 1.05)
                & ~anat.mediastinum(pu, pv) & off_hila)

    for name, radii, wobble in (("Mass", _MASS_RADIUS, 0.12), ("Nodule", _NODULE_RADIUS, 0.04)):
        if name in wanted:
            lesions[name] = _add_round_lesion(img, finding_rng[name], u, v, lung, inside, radii, wobble, taken)
    if "Effusion" in wanted:
        lesions["Effusion"] = _add_effusion(img, finding_rng["Effusion"], anat, u, v, lungs, markings)
    if "Pneumothorax" in wanted:
        lesions["Pneumothorax"] = _add_pneumothorax(img, finding_rng["Pneumothorax"], anat, u, v, lungs, markings)
    if "Cardiomegaly" in wanted:
        lesions["Cardiomegaly"] = heart.copy()
    return lesions


def make_phantom(size: int = 256, *, findings: Sequence[str] = (), seed: int = 0) -> Phantom:
    """Draw one frontal chest radiograph.

    Parameters
    ----------
    size : image side in pixels (>= 32); the image is (size, size).
    findings : any of :data:`SUPPORTED_FINDINGS` (aliases accepted, e.g. ``"pleural effusion"``).
    seed : non-negative integer; the same seed (and size) gives the same array.

    Returns
    -------
    Phantom with a (size, size) float32 image in [0, 1] and its masks.
    """
    wanted = _checked_request(size, findings, seed)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2 + len(SUPPORTED_FINDINGS))]
    anat, tex_rng = _draw_anatomy(streams[0]), streams[1]
    finding_rng = dict(zip(SUPPORTED_FINDINGS, streams[2:]))  # one stream each: findings stay independent
    size = int(size)
    u, v = _grid(size)

    sides = [anat.lung_shape(u, v, s) for s in (-1, 1)]
    thorax_px = _width(sides[0] | sides[1])
    target = finding_rng["Cardiomegaly"].uniform(*_ENLARGED_CTR) if "Cardiomegaly" in wanted else anat.ctr
    heart, heart_scale = _fit_heart(anat, u, v, thorax_px, target)
    medi = anat.mediastinum(u, v)
    lungs = [m & ~heart & ~medi for m in sides]
    lung = lungs[0] | lungs[1]
    below = v > anat.dome(u)

    # Sharp layers first; one blur at the end softens every edge alike.
    body = np.sqrt(np.clip(1.0 - ((u - anat.shift) / anat.body_half) ** 4 - ((v - 0.35) / 1.3) ** 4, 0.0, 1.0))
    body = np.maximum(body, np.sqrt(np.clip(1.0 - ((u - anat.shift) / 0.32) ** 2, 0.0, 1.0)) * (v < -0.5))
    abdomen = (body > 0) & below
    cardio = (heart | medi) & ~below
    post, ant = _ribs(anat, u, v)
    texture = _lung_texture(tex_rng, anat, size)
    hila = sum(np.exp(-(((u - anat.shift - s * 0.17) / 0.07) ** 2 + ((v + 0.02) / 0.11) ** 2)) for s in (-1, 1))
    bu, bdepth, bradius = anat.bubble
    bubble = abdomen & (np.hypot((u - anat.shift - bu) / 1.6, v - anat.dome(u) - bdepth) < bradius)

    img = 0.03 + (0.6 + 0.1 * (v + 1)) * body
    img = img - (0.4 - 0.08 * np.clip((v - anat.lung_top[0]) / 1.2, 0, 1)) * lung
    markings = 0.22 * texture + 0.08 * hila
    trachea = (np.abs(u - anat.shift) < 0.03) & (v < -0.25)
    img += markings * lung + 0.12 * cardio + 0.1 * abdomen - 0.12 * bubble
    img += 0.035 * _spine(anat, u, v) * body * ~below - 0.08 * trachea
    img += (0.13 * post + 0.07 * ant) * body * (1 - 0.8 * abdomen) * (1 - 0.7 * cardio)
    img += 0.15 * _clavicles(anat, u, v) * body

    lesions = _draw_lesions(img, wanted, finding_rng, anat, (u, v), lungs, markings, heart, heart_scale)

    img = ndimage.gaussian_filter(img, sigma=max(0.5, 1.1 * size / 256))
    img += tex_rng.normal(0.0, 0.012, img.shape)
    return Phantom(image=np.clip(img, 0.0, 1.0).astype(np.float32), lung_mask=lung, heart_mask=heart,
                   lesion_masks=lesions, labels={f: int(f in wanted) for f in NIH_FINDINGS},
                   ctr=_width(heart) / thorax_px, seed=int(seed))


def make_phantom_set(n: int, *, size: int = 256, seed: int = 0,
                     prevalence: Mapping[str, float] | None = None) -> list[Phantom]:
    """Draw ``n`` phantoms; each finding appears independently with its ``prevalence`` probability.

    ``prevalence`` maps supported finding names to probabilities in [0, 1] (default
    :data:`DEFAULT_PREVALENCE`; findings left out never appear). Each phantom's own seed is kept in
    ``Phantom.seed``, so ``make_phantom(size, findings=p.findings, seed=p.seed)`` redraws it.
    """
    if n < 0 or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"n and seed must be non-negative integers, got n={n!r}, seed={seed!r}")
    probs: dict[str, float] = {}
    for name, p in (DEFAULT_PREVALENCE if prevalence is None else prevalence).items():
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"prevalence of {name!r} must be in [0, 1], got {p}")
        probs[_resolve([name])[0]] = float(p)
    rng = np.random.default_rng(seed)
    seeds = np.random.SeedSequence(seed).generate_state(max(n, 1))[:n]
    out = []
    for s in seeds:
        draws = rng.random(len(SUPPORTED_FINDINGS))
        chosen = [f for f, x in zip(SUPPORTED_FINDINGS, draws) if x < probs.get(f, 0.0)]
        out.append(make_phantom(size, findings=chosen, seed=int(s)))
    return out


def _bbox(mask: np.ndarray) -> list[int]:
    """[x, y, w, h] in pixels of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def write_phantom_set(root: str | os.PathLike, n: int, *, size: int = 256, seed: int = 0,
                      prevalence: Mapping[str, float] | None = None) -> Path:
    """Write ``n`` phantoms as a manifest folder (the product's offline demo data set); return ``root``.

    Layout: ``images/phantom_00000.png`` (8-bit grey), ``masks/phantom_00000.png`` (lung 255, else 0)
    and ``manifest.csv`` with ``file, mask_file, patient_id, view_position, seed, finding_labels``, one
    0/1 column per NIH finding and ``lesion_bbox_json``: a JSON list of ``[label, x, y, w, h]`` in
    pixels of the written image. One phantom per patient.
    """
    root = Path(root)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    columns = ["file", "mask_file", "patient_id", "view_position", "seed", "finding_labels", *NIH_FINDINGS,
               "lesion_bbox_json"]
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for i, ph in enumerate(make_phantom_set(n, size=size, seed=seed, prevalence=prevalence)):
            name = f"phantom_{i:05d}.png"
            Image.fromarray(np.round(ph.image * 255).astype(np.uint8)).save(root / "images" / name)
            Image.fromarray(ph.lung_mask.astype(np.uint8) * 255).save(root / "masks" / name)
            boxes = [[f, *_bbox(ph.lesion_masks[f])] for f in ph.findings if ph.lesion_masks[f].any()]
            writer.writerow({"file": f"images/{name}", "mask_file": f"masks/{name}", "patient_id": f"P{i:05d}",
                             "view_position": "PA", "seed": ph.seed, "finding_labels": ph.finding_labels,
                             **ph.labels, "lesion_bbox_json": json.dumps(boxes)})
    return root
