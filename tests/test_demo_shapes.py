"""The shapes demo dataset (ppdistill.demo.shapes): deterministic, boxes tight around the drawn shapes,
balanced classes, COCO that pycocotools and ppdet read, and -o overrides that point the demo configs at
it; the digits dataset is unchanged by the shared writer."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle/pycocotools)

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO

from conftest import tree_digest

from ppdistill.demo import data, shapes
from ppdistill.demo.data import make_digits_dataset
from ppdistill.demo.shapes import CLASS_NAMES, make_image, make_shapes_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = dict(num_train=40, num_val=8, image_size=128, seed=3)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('shapes') / 'a')
    return out, make_shapes_dataset(out, **PARAMS)


def test_same_seed_is_bit_identical_and_another_differs(dataset, tmp_path):
    out, _ = dataset
    make_shapes_dataset(str(tmp_path / 'b'), **PARAMS)
    make_shapes_dataset(str(tmp_path / 'c'), **dict(PARAMS, seed=4))
    a, b, c = (tree_digest(p) for p in (out, str(tmp_path / 'b'), str(tmp_path / 'c')))
    assert len(a) == PARAMS['num_train'] + PARAMS['num_val'] + 3 and a == b
    assert a.keys() == c.keys() and a['annotations/instances_train.json'] != c['annotations/instances_train.json']


def test_digits_are_byte_identical_to_the_generator_before_the_shared_writer(tmp_path):
    """The digits written through ppdistill.demo.synth hash as the digits written by the generator before
    it (same seed, OpenCV 4.5's JPEG encoder; digest taken from that generator's output)."""
    out = str(tmp_path / 'digits')
    make_digits_dataset(out, num_train=3, num_val=2, seed=5)
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(out)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, out).encode())
            with open(path, 'rb') as f:
                h.update(f.read())
    assert h.hexdigest() == '7c93d854edd8ada77e9ee34ae178318cfaa89d3aa4f86b3d0380fd02f1969e28'


def test_boxes_are_tight_around_each_drawn_shape_and_occlusion_is_bounded():
    """Every shape's rendered pixels (alpha >= 0.25) lie in its box and touch all four sides; the box is
    inside the image; no shape loses more than _MAX_OCCLUDED of its pixels to later ones."""
    for seed in range(30):
        img, boxes, labels, masks = make_image(np.random.default_rng(seed), 128, 6, 10)
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert len(boxes) == len(labels) == len(masks) >= 1
        covered = np.zeros((128, 128), bool)
        for k in range(len(masks) - 1, -1, -1):  # later shapes are drawn on top
            x, y, w, h = boxes[k]
            assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128 and w > 0 and h > 0
            inside = np.zeros((128, 128), bool)
            inside[y:y + h, x:x + w] = True
            mask = masks[k]
            assert not (mask & ~inside).any()
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert (rows[0], rows[-1], cols[0], cols[-1]) == (y, y + h - 1, x, x + w - 1)
            assert (mask & ~covered).sum() >= (1 - shapes._MAX_OCCLUDED) * mask.sum() - 1e-9
            covered |= mask


def test_a_shape_is_drawn_where_its_mask_is():
    """The shape's colour is where its visible mask is: the image changes there against the same
    background drawn without objects."""
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    img, boxes, _, masks = make_image(rng_a, 128, 1, 1)
    background = shapes._background(rng_b, 128)
    diff = np.abs(img.astype(np.float32) - background).mean(axis=2)
    assert diff[masks[0]].mean() > 3 * diff[~masks[0]].mean()


def test_every_outline_class_is_hollow_and_filled_ones_are_not():
    """The filled/outlined pairs differ: the centre of a ring, square outline and triangle outline is
    empty; of circle, square, triangle, hexagon, star and cross it is ink (at the centroid: a triangle
    pointing up has it 2/3 down its box)."""
    for label, name in enumerate(CLASS_NAMES):
        alpha = shapes.render_shape(label, 60.0, 60.0, 0.0)
        h, w = alpha.shape
        cy = 2 * h // 3 if name.startswith('triangle') else h // 2
        centre = alpha[cy - 2:cy + 3, w // 2 - 2:w // 2 + 3].mean()
        if name in ('ring', 'square_outline', 'triangle_outline'):
            assert centre < 0.1, name
        elif name != 'crescent':
            assert centre > 0.9, name


def test_classes_roughly_uniform_and_all_sizes_present(dataset):
    _, info = dataset
    with open(info['train_ann']) as f:
        anns = json.load(f)['annotations']
    counts = np.bincount([a['category_id'] - 1 for a in anns], minlength=10)
    assert len(anns) >= 6 * PARAMS['num_train'] * 0.8
    assert counts.min() >= 0.5 * counts.mean() and counts.max() <= 1.5 * counts.mean(), counts
    areas = np.array([a['area'] for a in anns])
    assert (areas < 16 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any() and (areas >= 96 ** 2).any()


@pytest.mark.parametrize('split', ['train', 'val'])
def test_coco_json_loads_in_pycocotools_and_ppdet(dataset, split):
    from ppdet.data.source.coco import COCODataSet
    out, info = dataset
    coco = COCO(info[f'{split}_ann'])
    assert [c['name'] for c in coco.loadCats(sorted(coco.getCatIds()))] == CLASS_NAMES
    assert len(coco.getImgIds()) == PARAMS[f'num_{split}']
    ds = COCODataSet(dataset_dir=out, image_dir=split, anno_path=f'annotations/instances_{split}.json',
                     data_fields=['image', 'gt_bbox', 'gt_class', 'is_crowd'])  # as the demo reader
    ds.parse_dataset()
    assert len(ds.roidbs) == PARAMS[f'num_{split}']
    for rec in ds.roidbs:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=int(rec['im_id'][0])))
        assert os.path.isfile(rec['im_file'])
        want = np.array([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)], np.float32)
        np.testing.assert_allclose(rec['gt_bbox'], want)  # ppdet's x2 = x + w for integer boxes
        assert list(rec['gt_class'][:, 0]) == [ds.catid2clsid[a['category_id']] for a in anns]


def test_one_directory_never_passes_for_the_other_kind(tmp_path, monkeypatch):
    """A shapes dataset whose parameter record matches the digits' (same generator version) is still
    regenerated when the digits are asked for: the class names differ."""
    monkeypatch.setattr(shapes, 'GENERATOR_VERSION', data.GENERATOR_VERSION)
    out = str(tmp_path / 'd')
    make_shapes_dataset(out, num_train=2, num_val=1)
    info = make_digits_dataset(out, num_train=2, num_val=1)
    assert info['regenerated']
    with open(info['meta']) as f:
        assert json.load(f)['class_names'] == data.CLASS_NAMES
    assert not make_digits_dataset(out, num_train=2, num_val=1)['regenerated']


def test_cli_kind_shapes_writes_dataset_shapes(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, 'tools', 'make_demo_data.py'), '--kind', 'shapes',
           '--num_train', '2', '--num_val', '1']
    first = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, check=True)
    assert 'wrote dataset/shapes' in first.stdout
    with open(tmp_path / 'dataset' / 'shapes' / 'meta.json') as f:
        meta = json.load(f)
    assert meta['kind'] == 'shapes' and meta['class_names'] == CLASS_NAMES and meta['num_train'] == 2
    second = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, check=True)
    assert 'already holds a shapes dataset' in second.stdout


def test_dataset_dir_override_reaches_the_tagged_readers(tmp_path, monkeypatch):
    """`-o TrainDataset.dataset_dir=...` on the demo configs: ppdet's merge replaced the !COCODataSet by a
    dict; the tools set the dataset's attribute, and a misspelt attribute is one line."""
    from ppdet.data.source.coco import COCODataSet
    from ppdistill.cli import arg_parser, load_tool_config
    from ppdistill.config_scope import config_scope
    from ppdistill.errors import PPDistillError
    make_shapes_dataset(str(tmp_path / 'dataset' / 'shapes'), num_train=2, num_val=1)
    monkeypatch.chdir(tmp_path)
    cfg_path = os.path.join(REPO, 'configs', 'demo', 'picodet_student.yml')
    opts = [f'{s}.dataset_dir=dataset/shapes' for s in ('TrainDataset', 'EvalDataset', 'TestDataset')]
    with config_scope():
        cfg = load_tool_config(arg_parser().parse_args(['-c', cfg_path, '-o'] + opts), 'eval')
        for section in ('TrainDataset', 'EvalDataset'):
            assert isinstance(cfg[section], COCODataSet) and cfg[section].dataset_dir == 'dataset/shapes'
        assert cfg['TestDataset'].dataset_dir == 'dataset/shapes'
        cfg['EvalDataset'].parse_dataset()
        assert len(cfg['EvalDataset'].roidbs) == 1
    with config_scope(), pytest.raises(PPDistillError, match='TrainDataset.dataset_dri'):
        load_tool_config(arg_parser().parse_args(['-c', cfg_path, '-o', 'TrainDataset.dataset_dri=x']), 'eval')
