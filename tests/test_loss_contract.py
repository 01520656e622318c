"""The loss-author contract (ppdistill.losses.base.DistillLoss): every file in ppdistill/losses/ registers its
loss with ppdet when ppdistill is imported and follows the contract; the distiller builds losses from the
declared class attributes (per_level, equal_channels, tensor_names), never from their signatures."""
import glob
import inspect
import json
import os
import subprocess
import sys

import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import pytest
from ppdet.core.workspace import register

import ppdistill.losses
from ppdistill import Distiller, DistillConfigError
from ppdistill.errors import PPDistillError
from ppdistill.losses.base import DistillLoss, FeatureLoss, loss_total
from toy_models import ToyDet, toy_inputs

LOSS_DIR = os.path.dirname(ppdistill.losses.__file__)
# Modules of ppdistill/losses/ that hold no method: the contract itself and helpers shared by output and head losses.
HELPERS = {'__init__.py', 'base.py', 'outputs.py', 'dense_head.py', 'query_kd.py'}


def registered_losses() -> dict:
    """``{class name: module}`` of every ppdistill loss registered by a bare ``import ppdistill`` (fresh
    interpreter: a file that ``ppdistill/losses/__init__.py`` forgets to import registers nothing)."""
    code = ('import json, ppdistill\n'
            'from ppdet.core.workspace import global_config\n'
            'from ppdet.core.config.schema import SchemaDict\n'
            'print(json.dumps({k: v.pymodule.__name__ for k, v in global_config.items() if isinstance(v, SchemaDict)'
            ' and v.pymodule.__name__.startswith("ppdistill.losses.")}))\n')
    proc = subprocess.run([sys.executable, '-c', code], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(LOSS_DIR)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_loss_file_registers_a_distill_loss_on_import():
    registered = registered_losses()
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(LOSS_DIR, '*.py')))
    methods = [f for f in files if f not in HELPERS]
    assert len(methods) >= 9
    by_module = {}
    for name, module in registered.items():
        by_module.setdefault(module, []).append(name)
    for f in methods:
        module = 'ppdistill.losses.' + f[:-3]
        assert by_module.get(module), \
            f'ppdistill/losses/{f} registers no loss class (or losses/__init__.py does not import it)'
    assert not set(by_module) - {'ppdistill.losses.' + f[:-3] for f in methods}  # helpers register nothing
    for name, module in registered.items():
        cls = getattr(sys.modules[module], name)
        assert issubclass(cls, DistillLoss) and cls is not FeatureLoss, name
        assert name in ppdistill.losses.__all__, f'{name} is not exported from ppdistill.losses'


LOSSES = sorted(n for n in ppdistill.losses.__all__ if n not in ('DistillLoss', 'FeatureLoss'))
# channel counts that fit each output layout (A x (5 + C) for YOLOv3, A x K and A x 4 for SSD)
CHANNELS = {'SSDOutputLoss': {'conf': 24, 'loc': 12}, 'BinaryKDLoss': {'cls': 24},
            'BoxKDLoss': {'cls': 24, 'reg': 32}, 'LDLoss': {'cls': 24, 'reg': 32}}  # DFL: 4 * (reg_max 7 + 1)
ARGS = {'LDLoss': {'strides': [8]}}  # the VLR's grid: the 8x8 maps of a 64 px batch
# whole_output losses: probe shapes per name (DETR decoder outputs [L, N, Q, 4 | C], encoder heads [N, P, C | 4])
DECODER = {'boxes': (2, 1, 5, 4), 'logits': (2, 1, 5, 3)}
SHAPES = {'HungarianKDLoss': DECODER,
          'SharedQueryKDLoss': dict(DECODER, enc_scores=(1, 20, 3), enc_boxes=(1, 20, 4))}


def assignment(keys) -> dict:
    """What the distiller adds to the student mapping for ``keys`` (DistillLoss.assignment_keys)."""
    rng = np.random.default_rng(5)
    fed = {'pos': paddle.to_tensor((rng.random((2, 1, 8, 8)) < 0.2).astype('float32')),
           'num_pos': paddle.to_tensor(5.0)}
    return {k: fed[k] for k in keys}


def batch(n=2, size=64) -> dict:
    rng = np.random.default_rng(0)
    return {'image': paddle.to_tensor(rng.random((n, 3, size, size)).astype('float32')),
            'im_shape': paddle.to_tensor([[size, size]] * n, dtype='float32'),
            'gt_bbox': paddle.to_tensor([[[4., 6., 40., 30.], [0., 0., 0., 0.]]] * n),
            'pad_gt_mask': paddle.to_tensor([[[1.], [0.]]] * n)}


def feature(channels, grad, seed):
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal((2, channels, 8, 8)).astype('float32'))
    x.stop_gradient = not grad
    return x


@pytest.mark.parametrize('name', LOSSES)
def test_each_loss_follows_the_contract(name):
    cls = getattr(ppdistill.losses, name)
    params = inspect.signature(cls.forward).parameters  # forward(self, student, teacher, inputs=None)
    assert len(params) == 4 and list(params)[3] == 'inputs' and params['inputs'].default is None, name
    if cls.whole_output:
        cs = ct = None
    elif cls.tensor_names:
        cs = ct = CHANNELS[name]
    else:  # channels may differ unless the loss compares them one by one
        cs, ct = (24, 24) if cls.equal_channels else (16, 24)
    level = {'level': 0, 'num_levels': 1} if cls.per_level else {}
    paddle.seed(0)
    if cls.whole_output:
        loss = cls(student_shapes=SHAPES[name], teacher_shapes=SHAPES[name], **ARGS.get(name, {}))
        rng = np.random.default_rng(3)
        student, teacher = ({k: paddle.to_tensor(rng.random(s).astype('float32'), stop_gradient=side)
                             for k, s in SHAPES[name].items()} for side in (False, True))
        total = loss_total(loss(student, teacher, batch()), name)
        assert total.size == 1 and np.isfinite(float(total))
        return
    loss = cls(student_channels=cs, teacher_channels=ct, **level, **ARGS.get(name, {}))
    assert set(loss.assignment_keys) <= set(cls.assignment_keys), name  # an instance only narrows them
    if cls.tensor_names:
        student = {k: feature(cs[k], True, i) for i, k in enumerate(cls.tensor_names)}
        student.update(assignment(loss.assignment_keys))
        teacher = {k: feature(ct[k], False, 9 + i) for i, k in enumerate(cls.tensor_names)}
    else:
        student, teacher = feature(cs, True, 1), feature(ct, False, 2)
    value = loss(student, teacher, batch())
    total = loss_total(value, name)
    assert total.size == 1 and np.isfinite(float(total))
    if isinstance(value, dict):
        np.testing.assert_allclose(float(total), sum(float(v) for v in value.values()), rtol=1e-6)


# -- the distiller reads the declared contract -------------------------------------------------------------
@register
class ContractLevelProbeLoss(DistillLoss):
    """Records the level arguments it was built with; returns 0 (the gradient still reaches the student)."""
    per_level = True
    built: list = []

    def __init__(self, student_channels, teacher_channels, level=-1, num_levels=-1):
        super().__init__()
        ContractLevelProbeLoss.built.append((level, num_levels))

    def forward(self, student, teacher, inputs=None):
        return paddle.sum(student) * 0.0


@register
class ContractUndeclaredLevelLoss(ContractLevelProbeLoss):
    """Takes ``level`` but does not declare ``per_level``: it gets its default."""
    per_level = False


@register
class ContractEqualChannelsLoss(ContractUndeclaredLevelLoss):
    equal_channels = True


@register
class ContractVectorLoss(ContractUndeclaredLevelLoss):
    """Breaks the contract: a value per image."""

    def forward(self, student, teacher, inputs=None):
        return student.mean(axis=[1, 2, 3])


@register
class ContractPlainLayerLoss(paddle.nn.Layer):
    def forward(self, student, teacher, inputs=None):
        return paddle.mean(student)


def make(loss_type, **entry):
    paddle.seed(1)
    return Distiller(student_model=ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0),
                     teacher_model=ToyDet(width=16, neck_ch=8, levels=2, dropout=0.0),
                     losses=[dict({'type': loss_type, 'student': 'neck'}, **entry)], probe_size=32)


def test_level_arguments_reach_only_a_loss_that_declares_per_level():
    ContractLevelProbeLoss.built.clear()
    make('ContractLevelProbeLoss', levels=[1, 0])
    assert ContractLevelProbeLoss.built == [(1, 2), (0, 2)]
    ContractLevelProbeLoss.built.clear()
    make('ContractUndeclaredLevelLoss')
    assert ContractLevelProbeLoss.built == [(-1, -1), (-1, -1)]


@pytest.mark.parametrize('loss_type, entry, match', [
    ('ContractEqualChannelsLoss', {}, r'ContractEqualChannelsLoss: student 4 channels vs teacher 8\. They differ '
                                      r'in channels, but ContractEqualChannelsLoss compares them element by element'),
    ('FeatureMSELoss', {'student': {'a': 'neck'}}, r"FeatureMSELoss takes one tap per side .*naming \['a'\]"),
    ('SSDOutputLoss', {}, r"SSDOutputLoss needs student: \{conf: <tap>, loc: <tap>\}.*got 'neck'"),
    ('ContractLevelProbeLoss', {'args': {'level': 3}}, r"args \['level'\] are set by the distiller"),
    ('ContractPlainLayerLoss', {}, "'ContractPlainLayerLoss' is registered with ppdet but is not a distill loss"),
])
def test_a_config_that_breaks_the_contract_fails_at_build_in_one_line(loss_type, entry, match):
    with pytest.raises(DistillConfigError, match=match) as err:
        make(loss_type, **entry)
    assert '\n' not in str(err.value)


def test_a_loss_returning_a_non_scalar_stops_naming_the_term():
    d = make('ContractVectorLoss', name='vec')
    d.train()
    with pytest.raises(PPDistillError, match=r'ContractVectorLoss \(distill_vec_l0\) returned \[2\]; a distill '
                                             r'loss returns a scalar Tensor or a dict'):
        d(toy_inputs())


def test_class_attributes_are_checked_when_a_loss_is_defined():
    with pytest.raises(TypeError, match=r"BadLevels.__init__ must accept \['level', 'num_levels'\]"):
        type('BadLevels', (FeatureLoss,), {'per_level': True})
    with pytest.raises(TypeError, match='BadFlag.equal_channels must be True or False'):
        type('BadFlag', (FeatureLoss,), {'equal_channels': 'yes'})
    with pytest.raises(TypeError, match='BadNames.tensor_names must be None or a non-empty tuple'):
        type('BadNames', (FeatureLoss,), {'tensor_names': 'conf'})
    with pytest.raises(TypeError, match=r"BadKeys.assignment_keys must be a tuple of "
                                        r"\('pos', 'num_pos', 'assigned_scores_sum'\)"):
        type('BadKeys', (DistillLoss,), {'tensor_names': ('cls',), 'assignment_keys': ('labels',)})
    with pytest.raises(TypeError, match='BadBare.assignment_keys needs tensor_names'):
        type('BadBare', (DistillLoss,), {'assignment_keys': ('pos',)})
