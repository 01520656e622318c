"""Behaviour that must not depend on the ppdet/paddle version: where training writes, what tools print."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import io
import os
import subprocess
import sys
import types

import paddle
import pytest
from ppdet.core.workspace import AttrDict
from ppdet.engine.callbacks import Callback, Checkpointer

from ppdistill._env import IMPORT_NOISE, quiet_third_party_imports
from ppdistill.trainer import DistillCheckpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _develop_checkpointer_init(self, model):
    """PaddleDetection develop's ``Checkpointer.__init__``: ``save_dir`` without the config name."""
    Callback.__init__(self, model)
    self.best_ap = -1000.
    self.save_dir = self.model.cfg.save_dir
    self.uniform_output_enabled = self.model.cfg.get('uniform_output_enabled', False)
    self.weight = self.model.model


@pytest.mark.parametrize('ppdet_checkpointer', ['installed', 'develop'])
def test_training_output_goes_to_save_dir_slash_config_name(tmp_path, monkeypatch, ppdet_checkpointer):
    if ppdet_checkpointer == 'develop':
        monkeypatch.setattr(Checkpointer, '__init__', _develop_checkpointer_init)
    model = paddle.nn.Linear(2, 3)
    trainer = types.SimpleNamespace(
        cfg=AttrDict(save_dir=str(tmp_path / 'output'), filename='mgd_tiny', epoch=2, snapshot_epoch=1),
        model=model, optimizer=paddle.optimizer.SGD(parameters=model.parameters()), use_ema=False)
    DistillCheckpointer(trainer).on_epoch_end({'mode': 'train', 'epoch_id': 1})
    assert sorted(os.listdir(tmp_path / 'output')) == ['mgd_tiny']
    assert os.path.isfile(tmp_path / 'output' / 'mgd_tiny' / 'model_final.pdparams')


def test_import_noise_filter_drops_exact_lines_and_passes_everything_else():
    out = io.StringIO()
    noisy = f'{IMPORT_NOISE[0]}, please install numba'
    lines = ['keep me', noisy, f'  {noisy} (indented: not the library line, kept)',
             'PLEASE USE OMP_NUM_THREADS']
    saved = sys.stdout
    sys.stdout = out  # the filter wraps whatever stream is current when the block starts
    try:
        with quiet_third_party_imports():
            for line in lines:
                print(line)  # print writes the text and the newline separately
            sys.stdout.write('partial')
            sys.stdout.write(' line, no newline')
    finally:
        sys.stdout = saved
    assert out.getvalue() == ('keep me\n' + f'  {noisy} (indented: not the library line, kept)\n'
                              'PLEASE USE OMP_NUM_THREADS\npartial line, no newline')


def _run_tool(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='2')  # >1: what paddle warns about at import
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', args[0])] + args[1:], cwd=str(cwd),
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)


def test_tools_print_no_third_party_import_noise_but_keep_their_own_output(tmp_path):
    made = _run_tool(['make_demo_data.py', '--out', 'data', '--num_train', '1', '--num_val', '1'], tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    assert 'wrote data' in made.stdout
    failed = _run_tool(['train.py', '-c', 'missing.yml'], tmp_path)
    assert failed.returncode == 2
    assert "ppdistill: error: config file not found: 'missing.yml'" in failed.stderr
    for proc in (made, failed):
        for noise in ('Unable to use numba', 'OMP_NUM_THREADS', 'No ccache found'):
            assert noise not in proc.stdout + proc.stderr, (noise, proc.stdout[-1000:], proc.stderr[-1000:])


@pytest.mark.parametrize('with_labels', [False, True])
def test_infer_config_without_its_label_file_loads_on_any_ppdet(tmp_path, monkeypatch, with_labels):
    # PaddleDetection develop's ImageFolder hands TestDataset.get_anno() to pycocotools' COCO whenever
    # anno_path is set (ppdet 2.6 checks that the file exists first): a missing file must leave it unset.
    from pycocotools.coco import COCO
    from ppdistill.cli import arg_parser, load_tool_config
    from ppdistill.config_scope import config_scope
    monkeypatch.chdir(tmp_path)
    labels = tmp_path / 'dataset' / 'digits_tiny' / 'annotations' / 'instances_val.json'
    if with_labels:
        labels.parent.mkdir(parents=True)
        labels.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "one"}]}')
    flags = arg_parser().parse_args(['-c', os.path.join(ROOT, 'configs', 'demo', 'tiny', 'picodet_student.yml')])
    with config_scope():
        dataset = load_tool_config(flags, mode='test')['TestDataset']
        anno = dataset.get_anno()
        assert os.path.abspath(anno) == str(labels) if with_labels else anno is None
        coco = COCO(anno)  # what develop does with it: raises FileNotFoundError for a missing file
        if with_labels:
            assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == ['one']
