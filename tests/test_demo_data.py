import ppdistill  # noqa: F401  (import order: ppdet before paddle/pycocotools)

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO

from conftest import tree_digest

from ppdistill.demo.data import make_digits_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = dict(num_train=48, num_val=24, image_size=128, seed=3)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('digits') / 'a')
    info = make_digits_dataset(out, **PARAMS)
    return out, info


def test_same_seed_is_bit_identical(dataset, tmp_path):
    out, _ = dataset
    other = str(tmp_path / 'b')
    make_digits_dataset(other, **PARAMS)
    a, b = tree_digest(out), tree_digest(other)
    assert len(a) == PARAMS['num_train'] + PARAMS['num_val'] + 3
    assert a == b


def test_different_seed_differs(dataset, tmp_path):
    out, _ = dataset
    other = str(tmp_path / 'c')
    make_digits_dataset(other, **dict(PARAMS, seed=PARAMS['seed'] + 1))
    a, b = tree_digest(out), tree_digest(other)
    assert a.keys() == b.keys()
    assert a['annotations/instances_train.json'] != b[
        'annotations/instances_train.json']


def test_second_call_is_skipped_and_changed_params_regenerate(tmp_path):
    out = str(tmp_path / 'd')
    small = dict(PARAMS, num_train=4, num_val=2)
    assert make_digits_dataset(out, **small)['regenerated']
    before = tree_digest(out)
    assert not make_digits_dataset(out, **small)['regenerated']
    assert tree_digest(out) == before
    info = make_digits_dataset(out, **dict(small, num_train=3))
    assert info['regenerated'] and info['num_train'] == 3
    assert len(os.listdir(os.path.join(out, 'train'))) == 3


@pytest.mark.parametrize('split', ['train', 'val'])
def test_annotations_are_valid_coco(dataset, split):
    out, info = dataset
    coco = COCO(info['{}_ann'.format(split)])
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    assert [c['name'] for c in coco.loadCats(list(range(1, 11)))] == [
        str(i) for i in range(10)
    ]
    assert len(coco.getImgIds()) == PARAMS['num_{}'.format(split)]
    size = PARAMS['image_size']
    for img_id in coco.getImgIds():
        img = coco.loadImgs(img_id)[0]
        assert (img['width'], img['height']) == (size, size)
        assert os.path.isfile(os.path.join(out, split, img['file_name']))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert len(anns) >= 1
        for a in anns:
            x, y, w, h = a['bbox']
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= size and y + h <= size
            assert a['area'] == w * h
            assert a['iscrowd'] == 0


@pytest.mark.parametrize('split', ['train', 'val'])
def test_all_classes_and_sizes_present(dataset, split):
    _, info = dataset
    with open(info['{}_ann'.format(split)]) as f:
        anns = json.load(f)['annotations']
    assert {a['category_id'] for a in anns} == set(range(1, 11))
    areas = np.array([a['area'] for a in anns])
    assert (areas < 32**2).any()
    assert ((areas >= 32**2) & (areas < 96**2)).any()
    assert (areas >= 96**2).any()


def test_rendered_glyph_is_cropped_to_its_ink():
    """Boxes are the rendered glyph's extent: ink touches all four sides."""
    from ppdistill.demo import data
    images, _ = data._load_glyphs()
    for i in range(0, len(images), 97):
        for cell_w, cell_h in [(1.3, 1.5), (4.0, 3.3), (11.0, 12.5)]:
            alpha = data._render_glyph(images[i], cell_w, cell_h)
            assert alpha is not None
            for edge in (alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]):
                assert edge.max() >= 0.25


def test_cli_reports_skip(tmp_path):
    out = str(tmp_path / 'cli')
    cmd = [
        sys.executable,
        os.path.join(REPO, 'tools', 'make_demo_data.py'), '--out', out,
        '--num_train', '3', '--num_val', '2', '--image_size', '96'
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert 'wrote' in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert 'skipping regeneration' in second.stdout
    with open(os.path.join(out, 'meta.json')) as f:
        meta = json.load(f)
    assert meta['num_train'] == 3 and meta['image_size'] == 96
