"""Deterministic synthetic detection dataset of geometric shapes: a second demo dataset of another kind.

The digits (:mod:`ppdistill.demo.data`) differ by glyph identity at a fixed stroke style; here ten
classes differ by outline and by filled versus outlined drawing (a ring is an outlined circle, a square
outline a hollow square), at a wider scale range (12 px to more than half the image), aspect ratio
0.7-1.4, any rotation, any colour contrasting with its surroundings (lighter or darker), and partial
occlusion: a later shape may cover at most ``_MAX_OCCLUDED`` of an earlier one's pixels. Backgrounds
are textured (stripes, checks or blotches over a gradient) and cluttered with unlabelled distractors
that are no class (lines, open polylines, open arcs). Each box is tight around its shape's full
rendered extent (alpha >= 0.25), including any occluded part.

The output is the same COCO layout as the digits (:func:`ppdistill.demo.synth.build_dataset`), so the
demo configs read it by changing only ``dataset_dir``; categories have ids 1..10 and the names in
:data:`CLASS_NAMES`. The same seed gives bit-identical files.
"""

from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from ppdistill.demo.synth import build_dataset, split_rng

__all__ = ['make_shapes_dataset', 'shapes_params', 'GENERATOR_VERSION', 'DEFAULT_PARAMS', 'CLASS_NAMES']

# Bump whenever the generated content changes, so that cached datasets are regenerated.
GENERATOR_VERSION = 1

CLASS_NAMES = ['circle', 'ring', 'square', 'square_outline', 'triangle', 'triangle_outline', 'star',
               'cross', 'hexagon', 'crescent']

DEFAULT_PARAMS = dict(num_train=2000, num_val=500, image_size=128, min_objects=6, max_objects=10, seed=0)

_SMALL_MAX = 32 ** 2
_MEDIUM_MAX = 96 ** 2
_SIZE_PROBS = (0.45, 0.42, 0.13)
_MAX_OCCLUDED = 0.35  # of an earlier shape's pixels a later one may cover
_SUPER = 4  # supersampling of the shape rasteriser (anti-aliased edges)
_ALPHA_MIN = 0.25  # the extent of a shape (its box) is where its alpha reaches this


def shapes_params(num_train: int = DEFAULT_PARAMS['num_train'], num_val: int = DEFAULT_PARAMS['num_val'],
                  image_size: int = DEFAULT_PARAMS['image_size'],
                  min_objects: int = DEFAULT_PARAMS['min_objects'],
                  max_objects: int = DEFAULT_PARAMS['max_objects'], seed: int = DEFAULT_PARAMS['seed']) -> dict:
    """The parameter record stored in ``meta.json``."""
    return dict(kind='shapes', generator_version=GENERATOR_VERSION, num_train=int(num_train),
                num_val=int(num_val), image_size=int(image_size), min_objects=int(min_objects),
                max_objects=int(max_objects), seed=int(seed))


def _polygon(label: int) -> Optional[np.ndarray]:
    """The outline of a polygonal class in unit coordinates (inside [-1, 1]^2), else None."""
    if label in (2, 3):
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    if label in (4, 5):
        t = np.deg2rad([90, 210, 330])
        return np.stack([np.cos(t), -np.sin(t)], 1)
    if label == 6:
        t = np.deg2rad(90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(t), -r * np.sin(t)], 1)
    if label == 7:
        a = 0.33
        return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
                         [-1, a], [-1, -a], [-a, -a]], np.float64)
    if label == 8:
        t = np.deg2rad(60 * np.arange(6))
        return np.stack([np.cos(t), np.sin(t)], 1)
    return None


def render_shape(label: int, width: float, height: float, angle: float) -> Optional[np.ndarray]:
    """Alpha map (h, w) float32 in [0, 1] of class ``label`` scaled to about ``width`` x ``height``
    pixels and rotated by ``angle`` radians, cropped tightly to alpha >= ``_ALPHA_MIN`` (None if empty)."""
    side = int(np.ceil(np.hypot(width, height))) + 4
    n = side * _SUPER
    canvas = np.zeros((n, n), np.uint8)
    c = n / 2.0
    sx, sy = width * _SUPER / 2.0, height * _SUPER / 2.0
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    stroke = max(0.16 * min(width, height), 1.6) * _SUPER  # outlined classes: relative stroke width

    def to_px(pts):
        return np.round((pts * [sx, sy]) @ rot.T + c).astype(np.int32)

    poly = _polygon(label)
    if poly is not None:
        cv2.fillPoly(canvas, [to_px(poly)], 255, cv2.LINE_8)
        if label in (3, 5):  # outlined: remove the inside, inset by the stroke (a triangle's inradius is 1/2)
            k = 1 - (1 if label == 3 else 2) * stroke / min(sx, sy)
            if k > 0.1:
                cv2.fillPoly(canvas, [to_px(poly * k)], 0, cv2.LINE_8)
    else:
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        disc = np.stack([np.cos(t), np.sin(t)], 1)
        cv2.fillPoly(canvas, [to_px(disc)], 255, cv2.LINE_8)
        if label == 1:  # ring
            k = 1 - stroke / min(sx, sy)
            if k > 0.1:
                cv2.fillPoly(canvas, [to_px(disc * k)], 0, cv2.LINE_8)
        elif label == 9:  # crescent: a disc minus a shifted disc
            cv2.fillPoly(canvas, [to_px(disc * 0.85 + [0.45, 0.0])], 0, cv2.LINE_8)
    alpha = cv2.resize(canvas.astype(np.float32) / 255.0, (side, side), interpolation=cv2.INTER_AREA)
    ink = alpha >= _ALPHA_MIN
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if len(rows) == 0 or len(cols) == 0:
        return None
    return alpha[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _luma(color) -> float:
    c = np.asarray(color, dtype=np.float64)
    return float(0.114 * c[..., 0] + 0.587 * c[..., 1] + 0.299 * c[..., 2])  # BGR


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """Mid-tone gradient with a texture (stripes, checks or blotches) and unlabelled distractors that
    are no class: lines, open polylines and open arcs."""
    c1, c2 = rng.uniform(50, 200, size=3), rng.uniform(50, 200, size=3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
    t = np.cos(theta) * xx + np.sin(theta) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    kind = int(rng.integers(0, 3))
    amp = rng.uniform(10, 35)
    if kind == 0:  # stripes
        phi = rng.uniform(0, np.pi)
        period = rng.uniform(4, 16) / s
        tex = np.sin(2 * np.pi * (np.cos(phi) * xx + np.sin(phi) * yy) / period)
    elif kind == 1:  # checks
        cell = rng.uniform(4, 16) / s
        tex = np.where((np.floor(xx / cell) + np.floor(yy / cell)) % 2 == 0, 1.0, -1.0)
    else:  # blotches
        k = int(rng.integers(4, 10))
        tex = cv2.resize(rng.uniform(-1, 1, (k, k)).astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img + amp * tex[..., None] * rng.uniform(0.5, 1.0, 3), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        layer = img.copy()
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        thick = int(rng.integers(1, 3))
        what = int(rng.integers(0, 3))
        if what == 0:
            p1, p2 = (tuple(int(v) for v in rng.integers(-s // 4, s + s // 4, 2)) for _ in range(2))
            cv2.line(layer, p1, p2, color, thick, cv2.LINE_AA)
        elif what == 1:
            pts = rng.integers(0, s, (int(rng.integers(3, 6)), 2)).astype(np.int32)
            cv2.polylines(layer, [pts], False, color, thick, cv2.LINE_AA)
        else:
            c = tuple(int(v) for v in rng.integers(0, s, 2))
            axes = tuple(int(v) for v in rng.integers(max(s // 32, 2), s // 3, 2))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(layer, c, axes, float(rng.uniform(0, 180)), start, start + float(rng.uniform(60, 240)),
                        color, thick, cv2.LINE_AA)
        a = float(rng.uniform(0.3, 0.8))
        img = cv2.addWeighted(layer, a, img, 1 - a, 0)
    img = img.astype(np.float32) + rng.normal(0, rng.uniform(2, 8), img.shape).astype(np.float32)
    return np.clip(img, 0, 255)


def _target_area(rng: np.random.Generator, size: int) -> float:
    cat = int(rng.choice(3, p=_SIZE_PROBS))
    lo, hi = [(144.0, 0.95 * _SMALL_MAX), (1.1 * _SMALL_MAX, 0.92 * _MEDIUM_MAX),
              (1.06 * _MEDIUM_MAX, max(1.35 * _MEDIUM_MAX, 0.6 * size * size))][cat]
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def make_image(rng: np.random.Generator, size: int, min_objects: int, max_objects: int
               ) -> Tuple[np.ndarray, List[Tuple[int, int, int, int]], List[int], List[np.ndarray]]:
    """One image: ``(image (size, size, 3) uint8 BGR, boxes [(x, y, w, h)], labels, masks)`` where
    ``masks[k]`` (size, size) bool is where shape ``k``'s alpha reaches ``_ALPHA_MIN`` (occluded parts
    included)."""
    img = _background(rng, size)
    boxes, labels, masks, visible = [], [], [], []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        label = int(rng.integers(0, len(CLASS_NAMES)))
        area = _target_area(rng, size)
        aspect = float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
        h = np.sqrt(area / aspect)
        w = h * aspect
        fit = min(1.0, (size - 4) / max(w, h))
        alpha = render_shape(label, w * fit, h * fit, float(rng.uniform(0, 2 * np.pi)))
        if alpha is None or alpha.shape[0] > size or alpha.shape[1] > size:
            continue
        gh, gw = alpha.shape
        placed = None
        for _try in range(30):
            x, y = int(rng.integers(0, size - gw + 1)), int(rng.integers(0, size - gh + 1))
            mask = np.zeros((size, size), bool)
            mask[y:y + gh, x:x + gw] = alpha >= _ALPHA_MIN
            if all((v & ~mask).sum() >= (1 - _MAX_OCCLUDED) * m.sum() for v, m in zip(visible, masks)):
                placed = (x, y, mask)
                break
        if placed is None:
            continue
        x, y, mask = placed
        region = img[y:y + gh, x:x + gw]
        inside = alpha >= _ALPHA_MIN
        bg = _luma(region[inside].mean(axis=0))
        color = None
        for _try in range(12):
            c = rng.uniform(0, 255, size=3)
            if abs(_luma(c) - bg) >= 70:
                color = c
                break
        if color is None:  # the far end of the luma range
            color = np.full(3, 255.0 if bg < 128 else 0.0)
        a = alpha[..., None]
        img[y:y + gh, x:x + gw] = region * (1 - a) + color * a
        visible = [v & ~mask for v in visible] + [mask.copy()]
        masks.append(mask)
        boxes.append((x, y, gw, gh))
        labels.append(label)
    img = img + rng.normal(0, 3.0, size=img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), boxes, labels, masks


def make_shapes_dataset(out_dir: str, num_train: int = DEFAULT_PARAMS['num_train'],
                        num_val: int = DEFAULT_PARAMS['num_val'], image_size: int = DEFAULT_PARAMS['image_size'],
                        seed: int = DEFAULT_PARAMS['seed'], min_objects: int = DEFAULT_PARAMS['min_objects'],
                        max_objects: int = DEFAULT_PARAMS['max_objects'], overwrite: bool = False) -> Dict:
    """Write the synthetic shapes detection dataset in COCO format (arguments and result as
    :func:`ppdistill.demo.data.make_digits_dataset`; shapes per image: ``min_objects``..``max_objects``,
    a shape dropped when no place leaves every earlier one enough visible)."""
    params = shapes_params(num_train=num_train, num_val=num_val, image_size=image_size,
                           min_objects=min_objects, max_objects=max_objects, seed=seed)

    def draw(split, i):
        rng = split_rng(params['seed'], split, i, GENERATOR_VERSION)
        return make_image(rng, params['image_size'], params['min_objects'], params['max_objects'])[:3]

    return build_dataset(out_dir, params, overwrite, draw, CLASS_NAMES, 'shape', 'ppdistill synthetic shapes')
