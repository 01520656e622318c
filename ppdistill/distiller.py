"""The one distiller layer (DESIGN principle 2).

``Distiller`` owns ``student_model``, ``teacher_model`` and the distill modules (``distill_losses``, a
``LayerList``; align convs and generators live inside the losses). Training forward:

1. teacher forward without gradient, norm/dropout layers forced to eval on every call (the trainer's
   ``model.train()`` cannot flip the teacher's BatchNorm back to batch statistics); it stops as soon as
   every teacher tap has what it needs;
2. student forward through its own loss path, with taps recording;
3. each configured loss on every paired level, weighted, logged as ``distill_<name>_l<level>`` and added
   into ``loss``.

Eval/infer: exactly ``student_model(inputs)``. ``parameters()`` is the student's plus the distill
modules', never the teacher's.
"""
import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from ppdet.core.workspace import global_config, register
from ppdet.core.config.schema import SchemaDict
from ppdet.utils.logger import setup_logger

from .errors import PPDistillError
from .pairing import LevelPair, PairingError, pair_levels, probe_shapes
from .presets import LOGIT_ROLES, PRESETS, init_prefixes, resolve_tap
from .taps import TapSet

logger = setup_logger(__name__)

__all__ = ['Distiller', 'DistillConfigError']

# Layers whose train mode changes the teacher (running statistics) or its outputs (dropout).
_EVAL_ALWAYS = tuple(t for t in (
    getattr(nn.layer.norm, '_BatchNormBase', None), getattr(nn, 'BatchNorm', None),
    nn.Dropout, nn.Dropout2D, nn.Dropout3D, nn.AlphaDropout) if t is not None)


class DistillConfigError(PPDistillError):
    """A distillation config that cannot be built; the message says what to change."""


@dataclass(frozen=True)
class _Term:
    """One loss module applied to one student/teacher level pair."""
    key: str
    student_tap: str
    teacher_tap: str
    pair: LevelPair
    weight: float


def loss_class(name: str) -> type:
    """A registered loss class by name (e.g. ``MGDLoss``)."""
    entry = global_config.get(name)
    if not isinstance(entry, SchemaDict):
        known = sorted(k for k, v in global_config.items()
                       if isinstance(v, SchemaDict) and k.endswith('Loss') and 'ppdistill' in
                       getattr(v.pymodule, '__name__', ''))
        raise DistillConfigError(f"unknown distill loss type '{name}'; ppdistill losses: {', '.join(known)}")
    return getattr(entry.pymodule, name)


def _make_loss(cls: type, pair: LevelPair, args: dict, what: str) -> nn.Layer:
    kwargs = dict(args, student_channels=pair.student_channels, teacher_channels=pair.teacher_channels)
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = [p for p in params if p not in ('student_channels', 'teacher_channels', 'self')]
        raise DistillConfigError(f"{what}: {cls.__name__} has no argument(s) {unknown}; it accepts {accepted}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # a bad argument value: one line naming the loss entry
        raise DistillConfigError(f'{what}: {err}') from None


def _check_equal_channels(pair: LevelPair, what: str) -> None:
    """Logits are compared class by class (no align conv): a level pair must have equal channels."""
    if pair.student_channels != pair.teacher_channels:
        raise DistillConfigError(
            f"{what}: logits are compared class by class (no align conv), but student level "
            f"{pair.student_level} {pair.student_shape} and teacher level {pair.teacher_level} "
            f"{pair.teacher_shape} differ in channels (anchors x classes)")


@register
class Distiller(nn.Layer):
    """Arch-agnostic teacher→student distillation layer.

    Args:
        student_model, teacher_model: built ppdet architectures (passed by :mod:`ppdistill.build`).
        student_arch, teacher_arch: their ``architecture`` names, used to look up tap presets.
        losses: list of entries ``{type, student, teacher, levels, weight, args, name}``: ``type`` a
            registered loss class; ``student``/``teacher`` a preset role (``fpn``) or an exact sublayer
            name; ``levels`` student level indices (default all that pair by stride); ``args`` passed to
            the loss constructor with the channels of each level pair.
        probe_size: side of the blank image used at build time to read tap shapes and strides.
        init_student: copy the teacher's neck/head tensors into the student where names and shapes match
            (MGD's ``init_student``).
    """

    def __init__(self, student_model: nn.Layer = None, teacher_model: nn.Layer = None,
                 student_arch: str = None, teacher_arch: str = None, losses: Optional[list] = None,
                 probe_size: int = 320, init_student: bool = False):
        super().__init__()
        if student_model is None or teacher_model is None:
            raise DistillConfigError('Distiller needs student_model and teacher_model: build it with '
                                     'ppdistill.build.build_distiller(cfg)')
        if not losses:
            raise DistillConfigError('no distill losses configured (losses: [...] is empty)')
        self.student_model = student_model
        self.teacher_model = teacher_model
        for param in self.teacher_model.parameters():
            param.stop_gradient = True
            param.trainable = False
        student_arch = student_arch or type(student_model).__name__
        teacher_arch = teacher_arch or type(teacher_model).__name__
        student_preset, teacher_preset = PRESETS.get(student_arch, {}), PRESETS.get(teacher_arch, {})
        if init_student:
            self._init_student_from_teacher(init_prefixes(student_preset))

        entries = [self._normalise(e, (student_preset, student_arch), (teacher_preset, teacher_arch))
                   for e in losses]
        self.student_taps = TapSet(student_model, [e['student'] for e in entries])
        self.teacher_taps = TapSet(teacher_model, [e['teacher'] for e in entries])
        s_shapes = probe_shapes(student_model, self.student_taps, probe_size)
        t_shapes = probe_shapes(teacher_model, self.teacher_taps, probe_size)

        modules, self._terms = [], []
        for e in entries:
            what = f"loss '{e['name']}' ({e['type']} on {e['student']} -> {e['teacher']})"
            try:
                pairs = pair_levels(s_shapes[e['student']], t_shapes[e['teacher']], probe_size,
                                    e['levels'], what)
            except PairingError as err:
                raise DistillConfigError(str(err)) from None
            for pair in pairs:
                if e['logits'] or getattr(loss_class(e['type']), 'equal_channels', False):
                    _check_equal_channels(pair, what)
                modules.append(_make_loss(loss_class(e['type']), pair, e['args'], what))
                self._terms.append(_Term(f"distill_{e['name']}_l{pair.student_level}", e['student'],
                                         e['teacher'], pair, e['weight']))
        self.distill_losses = nn.LayerList(modules)
        logger.info('Distiller: ' + '; '.join(
            f"{t.key}: student {list(t.pair.student_shape[1:])} <- teacher {list(t.pair.teacher_shape[1:])}"
            for t in self._terms) + f' (shapes at probe size {probe_size})')

    @classmethod
    def from_config(cls, cfg, student_model=None, teacher_model=None, student_arch=None,
                    teacher_arch=None, **kwargs) -> dict:
        # ppdet's create() calls this with the keyword arguments given to create().
        return {'student_model': student_model, 'teacher_model': teacher_model,
                'student_arch': student_arch, 'teacher_arch': teacher_arch}

    @staticmethod
    def _normalise(entry: dict, student_preset: tuple, teacher_preset: tuple) -> dict:
        if not isinstance(entry, dict) or 'type' not in entry:
            raise DistillConfigError(f'each distill loss entry needs a type, got {entry!r}')
        unknown = set(entry) - {'type', 'student', 'teacher', 'levels', 'weight', 'args', 'name'}
        if unknown:
            raise DistillConfigError(f"distill loss entry {entry['type']}: unknown keys {sorted(unknown)}")
        loss_class(entry['type'])
        student = entry.get('student', 'fpn')
        try:
            student_tap = resolve_tap(student, *student_preset)
            teacher_tap = resolve_tap(entry.get('teacher', student), *teacher_preset)
        except KeyError as err:
            raise DistillConfigError(err.args[0]) from None
        return {
            'type': entry['type'],
            'student': student_tap,
            'teacher': teacher_tap,
            'levels': entry.get('levels'),
            'weight': float(entry.get('weight', 1.0)),
            'args': dict(entry.get('args') or {}),
            'name': entry.get('name') or entry['type'].lower().replace('loss', '') or 'kd',
            'logits': student in LOGIT_ROLES or entry.get('teacher', student) in LOGIT_ROLES,
        }

    def _init_student_from_teacher(self, prefixes: Sequence[str]) -> None:
        student_state = self.student_model.state_dict()
        teacher_state = self.teacher_model.state_dict()
        candidates = [k for k in student_state if any(k.startswith(p + '.') for p in prefixes)]
        copied = {k: teacher_state[k] for k in candidates
                  if k in teacher_state and list(teacher_state[k].shape) == list(student_state[k].shape)}
        self.student_model.set_state_dict(copied)
        logger.info(f"init_student: copied {len(copied)}/{len(candidates)} {'/'.join(prefixes)} tensors "
                    'from the teacher (names and shapes match)')

    # -- parameters: never the teacher's ------------------------------------------------------------
    def named_parameters(self, prefix: str = '', include_sublayers: bool = True, **kwargs):
        skip = (prefix + '.' if prefix else '') + 'teacher_model.'
        for name, param in super().named_parameters(prefix=prefix, include_sublayers=include_sublayers,
                                                    **kwargs):
            if not name.startswith(skip):
                yield name, param

    def parameters(self, include_sublayers: bool = True) -> List[paddle.Tensor]:
        return [p for _, p in self.named_parameters(include_sublayers=include_sublayers)]

    def distill_state_dict(self) -> Dict[str, paddle.Tensor]:
        """State of the distill modules alone (saved beside the student checkpoint)."""
        return self.distill_losses.state_dict()

    # -- forward ------------------------------------------------------------------------------------
    def _teacher_forward(self, inputs: dict) -> None:
        self.teacher_model.train()  # heads keep their training-time outputs, matching the student's
        for layer in self.teacher_model.sublayers():
            if isinstance(layer, _EVAL_ALWAYS):
                layer.eval()
        with paddle.no_grad(), self.teacher_taps.record(stop_early=True):
            self.teacher_model(dict(inputs))

    def distill_terms(self, inputs: dict) -> Dict[str, paddle.Tensor]:
        """Weighted loss per configured term from the tensors recorded in this step."""
        student = {n: self.student_taps.levels(n) for n in self.student_taps.specs}
        teacher = {n: self.teacher_taps.levels(n) for n in self.teacher_taps.specs}
        terms = {}
        for term, loss in zip(self._terms, self.distill_losses):
            s = student[term.student_tap][term.pair.student_level]
            t = teacher[term.teacher_tap][term.pair.teacher_level].detach()
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode='bilinear', align_corners=False)
            terms[term.key] = loss(s, t, inputs) * term.weight
        return terms

    def forward(self, inputs: dict):
        if not self.training:
            return self.student_model(inputs)
        try:
            self._teacher_forward(inputs)
            with self.student_taps.record():
                outputs = dict(self.student_model(inputs))
            terms = self.distill_terms(inputs)
        finally:
            self.student_taps.clear()
            self.teacher_taps.clear()
        distill_loss = paddle.add_n(list(terms.values()))
        outputs.update(terms)
        outputs['distill_loss'] = distill_loss
        outputs['loss'] = outputs['loss'] + distill_loss
        return outputs
