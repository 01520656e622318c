"""Integration: every user error in a distill config ends as one line `ppdistill: error: ...` (exit 2)
before training starts, never a traceback; infer/export need no eval annotations (issue 6).

The tools run as subprocesses, as a user types them (see tests/test_tools.py). None of these trains.
"""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
import yaml

from ppdet.core.workspace import load_config
from ppdistill.config_scope import config_scope, create_fresh
from conftest import provide_offline_font

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'demo', 'tiny')
STUDENT = os.path.join(TINY, 'picodet_student.yml')
TEACHER = os.path.join(TINY, 'picodet_teacher.yml')
UNREACHABLE = 'http://127.0.0.1:9/ppdistill_unreachable_teacher.pdparams'  # loopback, discard port


def tool(name, args, cwd):
    cmd = [sys.executable, os.path.join(ROOT, 'tools', name)] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=str(cwd), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=600)


def one_line_error(proc) -> str:
    """The single `ppdistill: error:` line of a run that stopped with exit 2 and no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('ppdistill: error:')]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert 'Epoch: [0]' not in proc.stdout + proc.stderr
    return errors[0]


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A working directory with the tiny dataset (train mode checks its annotation file)."""
    wd = tmp_path_factory.mktemp('errors')
    proc = tool('make_demo_data.py', ['--out', 'dataset/digits_tiny', '--num_train', '4', '--num_val', '2'], wd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd


def distill(path, section_name='MGDDistillModel', section=None, **top):
    cfg = dict({'slim': section_name, 'teacher_config': TEACHER, 'allow_random_teacher': True}, **top)
    if section is not None:
        cfg[section_name] = section
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(work, slim, *extra):
    return tool('train.py', ['-c', STUDENT, '--slim_config', slim] + list(extra), work)


# Every argument check of every loss, through the preset section and the generic `Distiller` section.
LOSS_ARGUMENT_CASES = [
    ('MGDDistillModel', {'lambda_mgd': 1.5}, 'lambda_mgd=1.5'),
    ('MGDDistillModel', {'lambda_mgd': -0.1}, 'lambda_mgd=-0.1'),
    ('MGDDistillModel', {'mask_mode': 'pixel'}, "mask_mode='pixel'"),
    ('MGDDistillModel', {'alpha_mgd': 'abc'}, "alpha_mgd='abc'"),
    ('FocalGlobalDistillModel', {'temp': 0}, 'temp=0'),
    ('FocalGlobalDistillModel', {'temp': -1.0}, 'temp=-1.0'),
    ('FocalGlobalDistillModel', {'gamma_fgd': 'abc'}, "gamma_fgd='abc'"),
    ('Distiller', {'losses': [{'type': 'FGDLoss', 'args': {'lambda_fgd': [1, 2]}}]}, 'lambda_fgd=[1, 2]'),
    ('Distiller', {'losses': [{'type': 'MGDLoss', 'args': {'lambda_mgd': 1.0}}]}, 'lambda_mgd=1.0'),
]


@pytest.mark.parametrize('section_name, section, want', LOSS_ARGUMENT_CASES,
                         ids=[f'{s}-{w}' for s, _, w in LOSS_ARGUMENT_CASES])
def test_out_of_range_loss_argument_names_section_and_key(work, tmp_path, section_name, section, want):
    err = one_line_error(train(work, distill(tmp_path / 'bad.yml', section_name, section)))
    assert err.startswith(f'ppdistill: error: {section_name}: ')
    assert f'bad argument {want}' in err


def test_slim_typo_lists_distillers_and_suggests_the_closest(work, tmp_path):
    err = one_line_error(train(work, distill(tmp_path / 'typo.yml', 'MGDDistilModel')))
    assert "slim: 'MGDDistilModel' is not a ppdistill distiller" in err
    assert 'did you mean MGDDistillModel?' in err
    for name in ('Distiller', 'FocalGlobalDistillModel', 'MGDDistillModel'):
        assert name in err


def test_unreachable_teacher_url_names_url_reason_and_local_file(work, tmp_path):
    slim = distill(tmp_path / 'url.yml', allow_random_teacher=False, teacher_weights=UNREACHABLE)
    err = one_line_error(train(work, slim))
    assert UNREACHABLE in err and 'Connection refused' in err
    assert 'set teacher_weights to the local .pdparams file' in err


@pytest.mark.parametrize('upstream, want', [
    # ppdet's CWD is defined for GFL and RetinaNet students; the PicoDet student has no upstream CWD
    ({'slim_method': 'CWD', 'distill_loss': 'CWDFeatureLoss', 'distill_loss_name': ['cls_f_0']},
     "ppdet's CWD is defined for ['GFL', 'RetinaNet'] students, the student is 'PicoDet'"),
    # ppdet's generic DistillModel with a loss that crashes there (PaddleDetection issue 9252)
    ({'distill_loss': 'KnowledgeDistillationKLDivLoss'}, 'DistillYOLOv3Loss only'),
    ({'slim_method': 'PPYOLOEDistill', 'DistillPPYOLOELoss': {'feat_distiller': 'mgd', 'logits_distill': False}},
     "feat_distiller 'mgd'"),
])
def test_upstream_term_without_a_mapping_stops_with_one_line(work, tmp_path, upstream, want):
    slim = tmp_path / 'upstream.yml'
    slim.write_text(yaml.safe_dump(dict({'_BASE_': [TEACHER], 'slim': 'Distill', 'allow_random_teacher': True},
                                        **upstream)))
    err = one_line_error(train(work, slim))
    assert want in err and str(slim) in err


def test_duplicate_loss_terms_name_both_entries(work, tmp_path):
    losses = [{'type': 'MGDLoss', 'levels': [0]}, {'type': 'MGDLoss', 'levels': [0, 1]}]
    err = one_line_error(train(work, distill(tmp_path / 'dup.yml', 'Distiller', {'losses': losses})))
    assert "entry #0 (MGDLoss on neck -> neck, name 'mgd') and entry #1" in err and 'distinct' in err


def test_teacher_config_equal_to_student_config_with_the_same_weights(work, tmp_path):
    weights = tmp_path / 'student_and_teacher.pdparams'
    weights.write_bytes(b'')
    slim = distill(tmp_path / 'self.yml', teacher_config=STUDENT, allow_random_teacher=False,
                   teacher_weights=str(weights))
    proc = train(work, slim, '-o', f'pretrain_weights={tmp_path / "student_and_teacher"}')
    err = one_line_error(proc)
    assert "is the student's pretrain_weights" in err
    assert 'teacher_config is the student config' in proc.stdout + proc.stderr  # the warning came first


@pytest.fixture(scope='module')
def student_weights(tmp_path_factory):
    """A (random) tiny PicoDet student checkpoint: infer/export only need a checkpoint of the config."""
    path = tmp_path_factory.mktemp('weights') / 'student'
    with config_scope():
        load_config(STUDENT)
        model = create_fresh('PicoDet')
    paddle.save(model.state_dict(), str(path) + '.pdparams')
    return path


def test_infer_and_export_need_no_eval_annotations(tmp_path, student_weights):
    from PIL import Image
    image = tmp_path / 'digit.jpg'
    Image.fromarray(np.full((96, 96, 3), 200, dtype=np.uint8)).save(image)
    assert not (tmp_path / 'dataset').exists()  # no annotation file of any split
    weights = ['-o', f'weights={student_weights}']
    provide_offline_font(tmp_path)
    proc = tool('infer.py', ['-c', STUDENT, '--infer_img', image, '--output_dir', 'drawn'] + weights, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / 'drawn' / 'digit.jpg').is_file()
    proc = tool('export_model.py', ['-c', STUDENT, '--output_dir', 'exported'] + weights, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    program = 'model.json' if paddle.__version__.startswith('3') else 'model.pdmodel'  # paddle 3 saves PIR
    assert (tmp_path / 'exported' / 'picodet_student' / program).is_file()
    # eval still checks the dataset it reads
    err = one_line_error(tool('eval.py', ['-c', STUDENT] + weights, tmp_path))
    assert 'EvalDataset: annotation file' in err
