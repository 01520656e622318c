"""Deterministic synthetic detection dataset built from scikit-learn's digits.

The 8x8 grayscale digits bundled with scikit-learn (``load_digits``, no
download needed) are upscaled and alpha-blended at small / medium / large
sizes (COCO area ranges, measured in pixels of the generated image) onto
cluttered backgrounds: colour gradients, low-frequency blotches, Gaussian
noise, random lines, rectangles, circles and ellipses.  Every image holds
several digits in random colours (always lighter than the background right
around them); digits may overlap a little.  Boxes are tight around the
visible ink of each digit.

The output is a COCO-format detection dataset laid out by
:func:`ppdistill.demo.synth.build_dataset` (``train/``, ``val/``,
``annotations/instances_{train,val}.json``, ``meta.json``).

Categories have ids 1..10 and names '0'..'9'.  The output only depends on
the parameters: the same seed gives bit-identical files.  Train and val
images use different random streams, and also disjoint subsets of the
scikit-learn digit samples (every fifth sample is reserved for val).
"""

import cv2
import numpy as np

from ppdistill.demo.synth import SPLITS, build_dataset, split_rng

__all__ = ['make_digits_dataset', 'dataset_params', 'GENERATOR_VERSION',
           'DEFAULT_PARAMS', 'CLASS_NAMES']

# Bump whenever the generated content changes, so that cached datasets
# (see ``meta.json``) are regenerated.
GENERATOR_VERSION = 6

CLASS_NAMES = [str(i) for i in range(10)]

DEFAULT_PARAMS = dict(
    num_train=2000,
    num_val=500,  # ~3000 objects: a steadier COCO AP than 160 images (the train split is unchanged)
    image_size=128,
    min_objects=6,
    max_objects=10,
    seed=0,
)

# COCO area thresholds (pixels^2, in the coordinates of the annotated image)
_SMALL_MAX = 32 ** 2
_MEDIUM_MAX = 96 ** 2
# probability of drawing a small / medium / large object
_SIZE_PROBS = (0.50, 0.42, 0.08)


def dataset_params(num_train=DEFAULT_PARAMS['num_train'],
                   num_val=DEFAULT_PARAMS['num_val'],
                   image_size=DEFAULT_PARAMS['image_size'],
                   min_objects=DEFAULT_PARAMS['min_objects'],
                   max_objects=DEFAULT_PARAMS['max_objects'],
                   seed=DEFAULT_PARAMS['seed']):
    """The parameter record stored in ``meta.json``."""
    return dict(
        generator_version=GENERATOR_VERSION,
        num_train=int(num_train),
        num_val=int(num_val),
        image_size=int(image_size),
        min_objects=int(min_objects),
        max_objects=int(max_objects),
        seed=int(seed),
    )


def _load_glyphs():
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    return images, labels


def _glyph_pool(split, images, labels):
    idx = np.arange(len(images))
    if split == 'val':
        keep = idx % 5 == 0
    else:
        keep = idx % 5 != 0
    return images[keep], labels[keep]


def _luma(color):
    c = np.asarray(color, dtype=np.float64)
    # colours are BGR (OpenCV order)
    return 0.114 * c[..., 0] + 0.587 * c[..., 1] + 0.299 * c[..., 2]


def _rand_color(rng, high=256):
    return tuple(int(v) for v in rng.integers(0, high, size=3))


def _background(rng, size):
    s = size
    # linear gradient between two random, fairly dark colours: digits are
    # always lighter than their surroundings (clutter may be as light)
    c1 = rng.uniform(0, 150, size=3)
    c2 = rng.uniform(0, 150, size=3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
    t = (np.cos(theta) * xx + np.sin(theta) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[
        ..., None]
    # low-frequency coloured blotches
    k = int(rng.integers(3, 7))
    blotch = rng.uniform(-60, 60, size=(k, k, 3)).astype(np.float32)
    blotch = cv2.resize(blotch, (s, s), interpolation=cv2.INTER_CUBIC)
    img = img + blotch * rng.uniform(0.3, 1.0)
    img = np.clip(img, 0, 255).astype(np.uint8)

    # clutter: lines and shapes, some of them semi-transparent
    n_shapes = int(rng.integers(2, 8))
    for _ in range(n_shapes):
        layer = img.copy()
        color = _rand_color(rng, 220)
        kind = int(rng.integers(0, 4))
        thick = int(rng.integers(1, 3))
        if kind == 0:  # line
            p1 = tuple(int(v) for v in rng.integers(-s // 4, s + s // 4, 2))
            p2 = tuple(int(v) for v in rng.integers(-s // 4, s + s // 4, 2))
            cv2.line(layer, p1, p2, color, thick, cv2.LINE_AA)
        elif kind == 1:  # rectangle
            p1 = rng.integers(0, s, 2)
            wh = rng.integers(s // 16, s // 2, 2)
            p2 = np.minimum(p1 + wh, s - 1)
            fill = -1 if rng.random() < 0.5 else thick
            cv2.rectangle(layer, tuple(int(v) for v in p1),
                          tuple(int(v) for v in p2), color, fill)
        elif kind == 2:  # circle
            c = tuple(int(v) for v in rng.integers(0, s, 2))
            r = int(rng.integers(max(s // 32, 2), s // 4))
            fill = -1 if rng.random() < 0.5 else thick
            cv2.circle(layer, c, r, color, fill, cv2.LINE_AA)
        else:  # ellipse arc
            c = tuple(int(v) for v in rng.integers(0, s, 2))
            axes = tuple(
                int(v) for v in rng.integers(max(s // 32, 2), s // 4, 2))
            angle = float(rng.uniform(0, 180))
            start = float(rng.uniform(0, 360))
            extent = float(rng.uniform(60, 360))
            cv2.ellipse(layer, c, axes, angle, start, start + extent, color,
                        thick, cv2.LINE_AA)
        a = float(rng.uniform(0.25, 0.75))
        img = cv2.addWeighted(layer, a, img, 1 - a, 0)

    noise_sigma = float(rng.uniform(2, 10))
    img = img.astype(np.float32) + rng.normal(
        0, noise_sigma, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255)


def _render_glyph(glyph8, cell_w, cell_h):
    """Upscale an 8x8 digit to an alpha map cropped tightly to its ink."""
    g = np.pad(glyph8, 1)  # fade out at the border
    w = max(int(round(10 * cell_w)), 10)
    h = max(int(round(10 * cell_h)), 10)
    a = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    # sharpen the blurry strokes (keeps the holes of 0/6/8/9 open)
    a = np.clip((a - 0.4) / 0.25, 0.0, 1.0)
    ink = a >= 0.25
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    if len(rows) == 0 or len(cols) == 0:
        return None
    return a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _ink_extent(glyph8):
    ink = glyph8 >= 0.25
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    return max(len(cols), 1), max(len(rows), 1)  # (w, h) in cells


def _sample_target_area(rng, size):
    cat = int(rng.choice(3, p=_SIZE_PROBS))
    if cat == 0:
        lo, hi = 400.0, 0.95 * _SMALL_MAX
    elif cat == 1:
        lo, hi = 1.1 * _SMALL_MAX, 0.92 * _MEDIUM_MAX
    else:
        lo = 1.06 * _MEDIUM_MAX
        hi = max(1.35 * _MEDIUM_MAX, 0.5 * size * size)
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _overlap_ok(box, boxes, max_frac=0.3):
    x, y, w, h = box
    for bx, by, bw, bh in boxes:
        iw = min(x + w, bx + bw) - max(x, bx)
        ih = min(y + h, by + bh) - max(y, by)
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        if inter > max_frac * min(w * h, bw * bh):
            return False
    return True


def _make_image(rng, size, pool_images, pool_labels, min_objects,
                max_objects):
    img = _background(rng, size)
    n_obj = int(rng.integers(min_objects, max_objects + 1))
    boxes, labels = [], []
    for _ in range(n_obj):
        gi = int(rng.integers(0, len(pool_images)))
        glyph = pool_images[gi]
        label = int(pool_labels[gi])
        ink_w, ink_h = _ink_extent(glyph)
        area = _sample_target_area(rng, size)
        aspect = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
        cell_h = np.sqrt(area / (ink_w * ink_h * aspect))
        cell_w = cell_h * aspect
        # make sure it fits into the image
        max_extent = size - 4
        fit = min(1.0, max_extent / (ink_h * cell_h + 1e-6),
                  max_extent / (ink_w * cell_w + 1e-6))
        alpha = _render_glyph(glyph, cell_w * fit, cell_h * fit)
        if alpha is None:
            continue
        gh, gw = alpha.shape
        if gh > size or gw > size:
            continue
        placed = None
        for _try in range(30):
            x = int(rng.integers(0, size - gw + 1))
            y = int(rng.integers(0, size - gh + 1))
            if _overlap_ok((x, y, gw, gh), boxes):
                placed = (x, y)
                break
        if placed is None:
            continue
        x, y = placed
        region = img[y:y + gh, x:x + gw]
        bg_luma = float(_luma(region.reshape(-1, 3).mean(axis=0)))
        color = None
        for _try in range(12):
            c = rng.uniform(0, 255, size=3)
            if float(_luma(c)) - bg_luma >= 90:
                color = c
                break
        if color is None:
            color = 255.0 - rng.uniform(0, 40, size=3)
        opacity = float(rng.uniform(0.9, 1.0))
        a = (alpha * opacity)[..., None]
        img[y:y + gh, x:x + gw] = region * (1 - a) + color[None, None, :] * a
        boxes.append((x, y, gw, gh))
        labels.append(label)

    # a little sensor noise on top of everything
    img = img + rng.normal(0, 3.0, size=img.shape).astype(np.float32)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return img, boxes, labels


def make_digits_dataset(out_dir,
                        num_train=DEFAULT_PARAMS['num_train'],
                        num_val=DEFAULT_PARAMS['num_val'],
                        image_size=DEFAULT_PARAMS['image_size'],
                        seed=DEFAULT_PARAMS['seed'],
                        min_objects=DEFAULT_PARAMS['min_objects'],
                        max_objects=DEFAULT_PARAMS['max_objects'],
                        overwrite=False):
    """Write the synthetic digits detection dataset in COCO format.

    Args:
        out_dir (str): output directory.
        num_train (int): number of training images.
        num_val (int): number of validation images.
        image_size (int): side of the square images, in pixels.
        seed (int): random seed; the same seed gives bit-identical output.
        min_objects, max_objects (int): digits per image (inclusive range;
            a digit is dropped if no free place is found for it).
        overwrite (bool): regenerate even if ``out_dir`` already holds a
            dataset made with the same parameters.

    Returns:
        dict with the paths (``out_dir``, ``train_dir``, ``val_dir``,
        ``train_ann``, ``val_ann``, ``meta``), the counts (``num_train``,
        ``num_val``, ``num_train_objects``, ``num_val_objects``),
        ``image_size``, ``params`` and ``regenerated`` (False when an
        existing identical dataset was kept).
    """
    params = dataset_params(
        num_train=num_train,
        num_val=num_val,
        image_size=image_size,
        min_objects=min_objects,
        max_objects=max_objects,
        seed=seed)
    pools = {}

    def draw(split, i):
        if not pools:
            images, labels = _load_glyphs()
            pools.update({s: _glyph_pool(s, images, labels) for s in SPLITS})
        rng = split_rng(params['seed'], split, i, GENERATOR_VERSION)
        return _make_image(rng, params['image_size'], *pools[split], params['min_objects'],
                           params['max_objects'])

    return build_dataset(out_dir, params, overwrite, draw, CLASS_NAMES, 'digit',
                         'ppdistill synthetic digits')
