"""CONTRIBUTING.md's steps, followed once in a throwaway copy of the package.

"Add a method" steps 1-2 (a loss file, its import in ``losses/__init__.py``) and "add an architecture"
step 2 (a preset row) are applied to a copy of ``ppdistill/`` in a temporary directory; a fresh process
that imports the copy must build a ``Distiller`` that names the new loss by ``type`` and the new role by
name, and compute the term the loss defines (checked against NumPy).
"""
import os
import shutil
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Step 1 of "add a method": one file, one registered FeatureLoss subclass.
NEW_LOSS = '''\
"""Mean absolute feature difference: a throwaway method written by following CONTRIBUTING.md."""
from typing import Optional

import paddle
from ppdet.core.workspace import register

from .base import FeatureLoss

__all__ = ['FeatureL1Loss']


@register
class FeatureL1Loss(FeatureLoss):
    """``loss_weight * mean(|align(S) - T|)`` over ``[N, Ct, H, W]``."""

    def __init__(self, student_channels: int, teacher_channels: int, loss_weight: float = 1.0):
        super().__init__(student_channels, teacher_channels)
        if float(loss_weight) < 0:
            raise ValueError(f'loss_weight must be >= 0, got {loss_weight}')
        self.loss_weight = float(loss_weight)

    def forward(self, student_feat: paddle.Tensor, teacher_feat: paddle.Tensor,
                inputs: Optional[dict] = None) -> paddle.Tensor:
        self.check_shapes(student_feat, teacher_feat)
        return self.loss_weight * paddle.abs(self.align_student(student_feat) - teacher_feat.detach()).mean()
'''

# Runs in the fresh process, with the copy first on sys.path.
CHECK = textwrap.dedent('''\
    import sys
    import numpy as np
    import paddle
    import ppdistill
    assert ppdistill.__file__.startswith(sys.argv[1]), ppdistill.__file__  # the copy, not the checkout
    from ppdistill import Distiller, DistillConfigError
    from toy_models import ToyDet

    paddle.seed(0)
    student, teacher = ToyDet(width=8, neck_ch=4, levels=2), ToyDet(width=16, neck_ch=8, levels=2)
    d = Distiller(student_model=student, teacher_model=teacher, probe_size=32,
                  losses=[{'type': 'FeatureL1Loss', 'student': 'lateral_maps', 'args': {'loss_weight': 0.5}}])
    inputs = {'image': paddle.rand([2, 3, 32, 32])}
    seen = d.inspect(inputs)
    assert sorted(seen.terms) == ['distill_featurel1_l0', 'distill_featurel1_l1'], sorted(seen.terms)
    # the term against NumPy, from the tensors the loss received and the loss's own align conv
    for key, loss in d.term_losses().items():
        s, t = seen.term_inputs[key]
        w = loss.align.weight.numpy()[:, :, 0, 0]
        aligned = np.einsum('oc,nchw->nohw', w, s.numpy()) + loss.align.bias.numpy()[None, :, None, None]
        want = 0.5 * np.abs(aligned - t.numpy()).mean()
        got = float(seen.terms[key])
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (key, got, want)
    try:
        Distiller(student_model=student, teacher_model=teacher, probe_size=32,
                  losses=[{'type': 'FeatureL1Loss', 'student': 'lateral_maps', 'args': {'loss_weight': -1}}])
    except DistillConfigError as err:
        assert 'loss_weight' in str(err) and '\\n' not in str(err), err
    else:
        raise AssertionError('a negative loss_weight was accepted')
    print('ok')
''')


def _follow_the_steps(tmp_path) -> str:
    copy = tmp_path / 'site'
    shutil.copytree(os.path.join(ROOT, 'ppdistill'), copy / 'ppdistill',
                    ignore=shutil.ignore_patterns('__pycache__'))
    losses = copy / 'ppdistill' / 'losses'
    (losses / 'featurel1.py').write_text(NEW_LOSS)
    with open(losses / '__init__.py', 'a') as f:  # step 2: the import runs @register
        f.write('from .featurel1 import FeatureL1Loss  # noqa: E402\n__all__.append("FeatureL1Loss")\n')
    # "add an architecture", step 2: one preset row (ToyDet, tests/toy_models.py), a new role for its neck
    presets = copy / 'ppdistill' / 'presets.py'
    text = presets.read_text()
    anchor = 'PRESETS: Dict[str, dict] = {\n'
    assert anchor in text
    presets.write_text(text.replace(anchor, anchor + "    'ToyDet': {'taps': {'lateral_maps': 'neck'}, "
                                                      "'init_student': ['neck', 'head']},\n", 1))
    return str(copy)


def test_a_new_loss_file_and_preset_row_are_picked_up_by_the_distiller(tmp_path):
    copy = _follow_the_steps(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([copy, os.path.join(ROOT, 'tests')]))
    proc = subprocess.run([sys.executable, '-c', CHECK, copy], cwd=str(tmp_path), env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stdout[-2000:] + proc.stderr[-4000:]


def test_without_the_preset_row_the_new_role_is_an_error(tmp_path):
    # The check above depends on the preset row: without it the role name is taken as a sublayer name,
    # which the toy model does not have, and the build fails naming it.
    copy = _follow_the_steps(tmp_path)
    presets = os.path.join(copy, 'ppdistill', 'presets.py')
    with open(presets) as f:
        text = f.read()
    with open(presets, 'w') as f:
        f.write(text.replace("'lateral_maps': 'neck'", "'other_role': 'neck'"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([copy, os.path.join(ROOT, 'tests')]))
    proc = subprocess.run([sys.executable, '-c', CHECK, copy], cwd=str(tmp_path), env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode != 0 and 'lateral_maps' in proc.stderr, proc.stderr[-3000:]
