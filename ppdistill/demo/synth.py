"""What the synthetic demo datasets share: COCO writing, per-image random streams, ``meta.json`` caching.

A generator (:mod:`ppdistill.demo.data` for digits, :mod:`ppdistill.demo.shapes` for shapes) supplies
its parameter record and a function drawing one image; :func:`build_dataset` writes::

    out_dir/
      train/000001.jpg ...
      val/000001.jpg ...
      annotations/instances_train.json
      annotations/instances_val.json
      meta.json            # generation parameters, written last (marks a complete dataset)

and keeps an existing dataset whose ``meta.json`` records the same parameters.
"""

import json
import os
import shutil
from typing import Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np

__all__ = ['SPLITS', 'split_rng', 'build_dataset']

SPLITS = ('train', 'val')
# split codes used to derive independent random streams
_SPLIT_CODES = {'train': 1, 'val': 2}
_JPEG_QUALITY = 92

# (image HxWx3 uint8 BGR, boxes [(x, y, w, h)], labels [0-based class index])
Drawn = Tuple[np.ndarray, List[Tuple[int, int, int, int]], List[int]]


def split_rng(seed: int, split: str, index: int, version: int) -> np.random.Generator:
    """The random stream of image ``index`` of ``split``: independent of every other image, so any
    image can be regenerated alone and train/val never share a stream."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index, version])


def _write_split(split: str, out_dir: str, num_images: int, size: int,
                 draw: Callable[[str, int], Drawn], class_names: Sequence[str], supercategory: str,
                 description: str, version: int) -> int:
    """Draw ``num_images`` images of ``split`` with ``draw(split, index)``; write them and their COCO
    json. Returns the number of objects."""
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    coco_images, coco_anns = [], []
    ann_id = 1
    for i in range(num_images):
        img, boxes, labs = draw(split, i)
        image_id = i + 1
        file_name = '{:06d}.jpg'.format(image_id)
        ok, buf = cv2.imencode('.jpg', img, [int(cv2.IMWRITE_JPEG_QUALITY), _JPEG_QUALITY])
        if not ok:
            raise RuntimeError('failed to encode image {}'.format(file_name))
        with open(os.path.join(img_dir, file_name), 'wb') as f:
            f.write(buf.tobytes())
        coco_images.append(dict(id=image_id, file_name=file_name, width=size, height=size))
        for (x, y, w, h), lab in zip(boxes, labs):
            coco_anns.append(
                dict(id=ann_id, image_id=image_id, category_id=lab + 1,
                     bbox=[int(x), int(y), int(w), int(h)], area=int(w * h), iscrowd=0,
                     segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]]))
            ann_id += 1
    coco = dict(
        info=dict(description='{} ({})'.format(description, split), version=str(version)),
        licenses=[],
        images=coco_images,
        annotations=coco_anns,
        categories=[dict(id=k + 1, name=name, supercategory=supercategory)
                    for k, name in enumerate(class_names)])
    ann_path = os.path.join(out_dir, 'annotations', 'instances_{}.json'.format(split))
    with open(ann_path, 'w') as f:
        json.dump(coco, f, separators=(',', ':'))
    return len(coco_anns)


def _result(out_dir: str, meta: dict, regenerated: bool, param_keys: Sequence[str]) -> dict:
    return dict(
        out_dir=out_dir,
        train_dir=os.path.join(out_dir, 'train'),
        val_dir=os.path.join(out_dir, 'val'),
        train_ann=os.path.join(out_dir, 'annotations', 'instances_train.json'),
        val_ann=os.path.join(out_dir, 'annotations', 'instances_val.json'),
        meta=os.path.join(out_dir, 'meta.json'),
        num_train=meta['num_train'],
        num_val=meta['num_val'],
        num_train_objects=meta.get('num_train_objects'),
        num_val_objects=meta.get('num_val_objects'),
        image_size=meta['image_size'],
        params={k: meta[k] for k in param_keys},
        regenerated=regenerated)


def _existing_meta(out_dir: str):
    """The ``meta.json`` of a complete dataset in ``out_dir`` (annotations and image counts present),
    else None."""
    try:
        with open(os.path.join(out_dir, 'meta.json')) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    for split in SPLITS:
        if not os.path.isfile(os.path.join(out_dir, 'annotations', 'instances_{}.json'.format(split))):
            return None
        img_dir = os.path.join(out_dir, split)
        if not os.path.isdir(img_dir) or len(os.listdir(img_dir)) != meta.get('num_' + split, -1):
            return None
    return meta


def _check_params(params: Dict[str, int]) -> None:
    """The checks every generator's common parameters need (ValueError)."""
    if params['image_size'] < 32:
        raise ValueError('image_size must be >= 32')
    if not 1 <= params['min_objects'] <= params['max_objects']:
        raise ValueError('need 1 <= min_objects <= max_objects')
    if params['num_train'] < 1 or params['num_val'] < 1:
        raise ValueError('num_train and num_val must be >= 1')


def build_dataset(out_dir: str, params: Dict[str, int], overwrite: bool, draw: Callable[[str, int], Drawn],
                  class_names: Sequence[str], supercategory: str, description: str) -> dict:
    """Write the dataset (or keep an existing one made with ``params``) and describe it.

    Args:
        params: the record stored in ``meta.json`` (with ``generator_version``, ``num_train``,
            ``num_val``, ``image_size``, ``min_objects``, ``max_objects``, ``seed``, and any other key).
        draw: ``draw(split, index) -> (image, boxes, labels)``, deterministic in its arguments.

    Returns:
        dict with the paths (``out_dir``, ``train_dir``, ``val_dir``, ``train_ann``, ``val_ann``,
        ``meta``), the counts (``num_train``, ``num_val``, ``num_train_objects``, ``num_val_objects``),
        ``image_size``, ``params`` and ``regenerated`` (False when an existing identical dataset was kept).
    """
    _check_params(params)
    if not overwrite:
        meta = _existing_meta(out_dir)
        if meta is not None and meta.get('class_names') == list(class_names) and all(
                meta.get(k) == v for k, v in params.items()):  # class names: another generator's dataset
            return _result(out_dir, meta, False, list(params))

    # start from a clean slate (old images may be left over otherwise)
    for sub in SPLITS + ('annotations',):
        p = os.path.join(out_dir, sub)
        if os.path.isdir(p):
            shutil.rmtree(p)
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)
    os.makedirs(os.path.join(out_dir, 'annotations'), exist_ok=True)

    meta = dict(params)
    for split in SPLITS:
        meta['num_{}_objects'.format(split)] = _write_split(
            split, out_dir, params['num_' + split], params['image_size'], draw, class_names, supercategory,
            description, params['generator_version'])
    meta['class_names'] = list(class_names)
    # meta.json is written last: its presence marks a complete dataset
    with open(meta_path, 'w') as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write('\n')
    return _result(out_dir, meta, True, list(params))
