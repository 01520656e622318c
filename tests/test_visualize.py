"""tools/visualize.py on a tiny PicoDet pair: one PNG per distill term, plain student checkpoint + teacher."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import json
import os
import subprocess
import sys

import paddle
import pytest
import yaml
from PIL import Image

from ppdet.core.workspace import load_config
from ppdistill.config_scope import config_scope, create_fresh

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'demo', 'tiny')


def tool(args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', args[0])] + args[1:], cwd=str(cwd),
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=900)


def save_fresh(config: str, path: str) -> int:
    """A freshly initialised model of ``config`` saved as a plain ppdet checkpoint; its FPN level count."""
    paddle.seed(0)
    with config_scope():
        cfg = load_config(config)
        model = create_fresh(cfg.architecture)
        levels = cfg['LCPAN']['num_features']
    os.makedirs(os.path.dirname(path), exist_ok=True)
    paddle.save(model.state_dict(), path + '.pdparams')
    return levels


def annotated_boxes(root, name: str) -> int:
    """How many boxes the tiny val annotation lists for the image ``name``."""
    coco = json.loads((root / 'dataset' / 'digits_tiny' / 'annotations' / 'instances_val.json').read_text())
    ids = {im['id'] for im in coco['images'] if os.path.basename(im['file_name']) == name}
    return sum(a['image_id'] in ids for a in coco['annotations'])


def test_visualize_writes_one_png_per_term(tmp_path):
    proc = tool(['make_demo_data.py', '--out', 'dataset/digits_tiny', '--num_train', '2', '--num_val', '2'],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    levels = save_fresh(os.path.join(TINY, 'picodet_teacher.yml'), str(tmp_path / 'ckpt' / 'teacher'))
    save_fresh(os.path.join(TINY, 'picodet_student.yml'), str(tmp_path / 'ckpt' / 'student'))
    distill = {'slim': 'Distiller', 'teacher_config': os.path.join(TINY, 'picodet_teacher.yml'),
               'teacher_weights': str(tmp_path / 'ckpt' / 'teacher'),
               'Distiller': {'probe_size': 96, 'losses': [
                   {'type': 'MGDLoss', 'name': 'mgd', 'levels': [0]}, {'type': 'FGDLoss', 'name': 'fgd'}]}}
    (tmp_path / 'distill.yml').write_text(yaml.safe_dump(distill))
    image = sorted((tmp_path / 'dataset' / 'digits_tiny' / 'val').iterdir())[0]
    proc = tool(['visualize.py', '-c', os.path.join(TINY, 'picodet_student.yml'), '--slim_config',
                 'distill.yml', '--infer_img', str(image), '-o', f"weights={tmp_path / 'ckpt' / 'student'}",
                 '--output_dir', 'vis', '--draw_threshold', '0.0'], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    want = {f'{image.stem}_distill_mgd_l0.png'} | {f'{image.stem}_distill_fgd_l{i}.png' for i in range(levels)}
    assert set(os.listdir(tmp_path / 'vis')) == want
    # a val image: its annotated boxes drive the GT-aware masks
    n_boxes = annotated_boxes(tmp_path, image.name)
    assert f'masks from {n_boxes} ground-truth boxes' in proc.stdout and n_boxes > 0
    for name in want:
        with Image.open(tmp_path / 'vis' / name) as png:
            assert png.format == 'PNG' and png.size[0] > 300 and png.size[1] > 200
        assert f'wrote vis/{name}' in proc.stdout

    # without a distill config there is no teacher to compare with: one line, no traceback
    proc = tool(['visualize.py', '-c', os.path.join(TINY, 'picodet_student.yml'), '--infer_img', str(image),
                 '-o', f"weights={tmp_path / 'ckpt' / 'student'}"], tmp_path)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith('ppdistill: error:')][0].count(
        '--slim_config') == 1
