"""The one distiller layer (docs/design.md, principle 2).

``Distiller`` owns ``student_model``, ``teacher_model`` and the distill modules (``distill_losses``, a
``LayerList``; align convs and generators live inside the losses). Training forward:

1. teacher forward without gradient, the *whole* teacher in eval mode on every call (the trainer's
   ``model.train()`` flips it back each epoch): BatchNorm uses its running statistics and every stochastic
   layer of any kind (Dropout, ppdet's DropBlock, DropPath, ...) is off, so the same inputs give the same
   tapped tensors. It stops as soon as every teacher tap has fired as often as in the build-time probe
   (also eval mode), from the first step on: the teacher's head, loss and post-processing never run
   unless tapped, so the teacher needs nothing from the student's reader beyond what its tapped layers
   read;
2. student forward through its own loss path, with taps recording; both tap sets check their call counts
   against the probe on every step (:class:`~ppdistill.taps.TapCountError`). When a loss reads the student
   head's label assignment (``assignment_keys``), the assigner the preset row names is tapped too and its
   positives are sliced per level into that loss's student mapping (:mod:`ppdistill.assignment`);
3. CrossKD entries only (``cross``): a second, partial teacher forward in eval mode and in the graph,
   whose cut sublayer returns the student's adapted cut features (:mod:`ppdistill.crossing`); the
   teacher's outputs from it are those terms' student inputs. A loss with ``replacements`` (KD-DETR's
   shared queries) gets the same kind of pass (:meth:`Distiller._rerun`) for the models it names, with
   tapped sublayers returning the tensors it computed from this step's taps; it then compares the taps of
   those runs;
4. each configured loss on every paired level, in float32 and outside autocast whatever the AMP level
   (features are cast to float32; the distill modules keep float32 weights under ``amp_level: O2``),
   weighted, logged as ``distill_<name>_l<level>`` and added into ``loss``. One ``isfinite`` over all
   terms (one host sync per step) guards the sum: a non-finite term stops training naming the term, or
   with ``nonfinite: skip`` drops that step's distill loss with a warning.

A ``weight: auto`` entry's weight is measured once, before the first optimizer update
(:meth:`Distiller.calibrate`, :mod:`ppdistill.auto_weight`), and kept with the distill state.

:meth:`Distiller.inspect` runs steps 1-4 and returns every tensor (taps, loss inputs, terms) instead of the
sum, for tools that look inside a step (benchmarks, ``tools/visualize.py``).

Eval/infer: exactly ``student_model(inputs)``. ``parameters()`` is the student's plus the distill
modules', never the teacher's.
"""
import contextlib
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F
from ppdet.core.workspace import global_config, register
from ppdet.core.config.schema import SchemaDict
from ppdet.utils.logger import setup_logger

from .assignment import Assignment, level_masks, resize_mask
from .auto_weight import AUTO, AutoWeights, auto_weight_settings, measure_ratios, mean_over_ranks, weights_from_ratios
from .crossing import CrossAdapter
from .errors import PPDistillError
from .gradients import student_parameters
from .pairing import LevelPair, PairingError, pair_levels, probe_shapes
from .presets import LOGIT_ROLES, init_prefixes, resolve_tap, select_preset
from .losses.base import DistillLoss, loss_total
from .taps import TapSet
from .watch import TermWatch

logger = setup_logger(__name__)

__all__ = ['Distiller', 'DistillConfigError', 'Inspection', 'NonFiniteDistillLoss']

_NONFINITE_MODES = ('error', 'skip')
TapSpec = Union[str, Dict[str, str]]
Channels = Union[int, Dict[str, int]]


class DistillConfigError(PPDistillError):
    """A distillation config that cannot be built; the message says what to change."""


class NonFiniteDistillLoss(PPDistillError):
    """A distill loss term was inf/NaN in a training step (``nonfinite: error``, the default)."""


def _keep_float32(layer: nn.Layer) -> None:
    """Keep ``layer``'s parameters float32 under ``paddle.amp.decorate(level='O2')`` (ppdet's
    ``amp_level: O2``), as its ``excluded_layers`` argument would; ppdet passes none. Paddle <= 2.6 spells
    the flag ``_cast_to_low_precison``, later versions ``_cast_to_low_precision``."""
    for sub in layer.sublayers(include_self=True):
        sub._cast_to_low_precison = False
        sub._cast_to_low_precision = False


def _float32(x: paddle.Tensor) -> paddle.Tensor:
    return x if x.dtype == paddle.float32 else paddle.cast(x, 'float32')


@dataclass(frozen=True)
class _Term:
    """One loss module applied to one student/teacher level pair.

    ``student_tap``/``teacher_tap``: a tap spec, or for a multi-tensor loss a mapping ``{name: spec}``;
    ``assignment``: the keys of the student head's label assignment its loss reads (``assignment_keys``)."""
    key: str
    student_tap: TapSpec
    teacher_tap: TapSpec
    pair: LevelPair
    weight: float
    assignment: Tuple[str, ...] = ()
    # CrossKD: {'name': the crossing's (its first entry's) name, 'cuts': [{'student': cut tap, 'at': teacher cut
    # tap}], 'levels': the cut pair per cut, 'owner': whether this term's loss holds the crossing's adapters}
    cross: Optional[dict] = None
    auto: Optional[int] = None  # weight: auto entries: the index of the entry's measured factor (AutoWeights)
    whole: bool = False  # a whole_output loss: its tensors taken whole, never resized
    rerun: bool = False  # its loss defines replacements: its inputs may come from second runs of the models


@dataclass(frozen=True)
class Inspection:
    """What one distill step computes (:meth:`Distiller.inspect`), before it is summed into ``loss``.

    Attributes:
        terms: every entry the training forward logs: each term's weighted scalar under its key
            ``distill_<name>_l<level>`` and, for a loss returning sub-terms, ``<key>_<sub_term>``.
        term_inputs: ``{term key: (student, teacher)}``, what each loss received: float32 ``[N, Cs, H, W]``
            resized to the teacher's ``H, W`` (in the graph) and ``[N, Ct, H, W]`` (detached), or
            ``{name: tensor}`` per side for a multi-tensor loss; a loss with ``assignment_keys`` also finds
            them in its student mapping (``pos`` ``[N, 1, H, W]``, ``num_pos`` scalar).
        student_taps, teacher_taps: ``{tap spec: one tensor per level}`` as recorded (native dtype and
            size), e.g. ``{'neck': [[N, C, H/8, W/8], [N, C, H/16, W/16], ...]}``.
        outputs: the student's own outputs (its loss dict in train mode, predictions in eval mode).
        det_loss: the student's own scalar ``loss`` in train mode, else None.
        crossed: CrossKD's ``{crossing: {teacher tap spec: one tensor per level}}``, the teacher's outputs on
            the student's crossed features (in the graph), their terms' student inputs; entries with the same
            ``cross`` and ``levels`` share one crossing, named after the first of them.
    """
    terms: Dict[str, paddle.Tensor]
    term_inputs: Dict[str, tuple]
    student_taps: Dict[str, List[paddle.Tensor]]
    teacher_taps: Dict[str, List[paddle.Tensor]]
    outputs: dict
    det_loss: Optional[paddle.Tensor]
    crossed: Dict[str, Dict[str, List[paddle.Tensor]]] = field(default_factory=dict)

    @property
    def distill_loss(self) -> paddle.Tensor:
        """Scalar: the sum of the terms (sub-terms excluded), what the training forward adds into ``loss``
        (when every term is finite). Computed on access: the training step sums with its own check."""
        return paddle.add_n([self.terms[key] for key in self.term_inputs])


def _tap_specs(spec: TapSpec) -> List[str]:
    """The tap specs of a loss side: one, or every value of a ``{name: spec}`` mapping."""
    return list(spec.values()) if isinstance(spec, dict) else [spec]


def _first_spec(spec: TapSpec) -> str:
    return _tap_specs(spec)[0]


def _resolve_side(spec, preset: dict, arch: str) -> TapSpec:
    """A loss entry's ``student``/``teacher`` value resolved to tap specs (a mapping resolves each value)."""
    if isinstance(spec, dict):
        if not spec:
            raise DistillConfigError('an empty {name: tap} mapping names no taps')
        return {str(k): resolve_tap(v, preset, arch) for k, v in spec.items()}
    return resolve_tap(spec, preset, arch)


def _multi_channels(entry: dict, pair: LevelPair, s_shapes: dict, t_shapes: dict,
                    crossed: bool = False) -> Tuple[dict, dict]:
    """Per-name channels ``({name: Cs}, {name: Ct})`` of a multi-tensor entry at one level pair (a
    ``crossed`` entry's student tensors are teacher taps: the pair's teacher level on both sides)."""
    level = pair.teacher_level if crossed else pair.student_level
    return ({k: int(s_shapes[v][level][1]) for k, v in entry['student'].items()},
            {k: int(t_shapes[v][pair.teacher_level][1]) for k, v in entry['teacher'].items()})


def _entry_pairs(entry: dict, s_shapes: dict, t_shapes: dict, probe_size: int,
                 what: str) -> List[Tuple[LevelPair, List[LevelPair]]]:
    """``(term pair, cut pairs)`` per distilled level of an entry. A plain entry pairs its own taps by stride
    (no cuts). A ``cross`` entry pairs the student's and the teacher's taps of each cut by stride (every cut
    the same levels); teacher cut level ``j`` feeds the teacher's level ``j`` outputs, compared with
    themselves: the term pair is ``(student cut level, j)`` with the teacher's shapes on both sides."""
    try:
        if not entry['cross']:
            return [(p, []) for p in pair_levels(s_shapes[_first_spec(entry['student'])],
                                                 t_shapes[_first_spec(entry['teacher'])], probe_size,
                                                 entry['levels'], what)]
        outputs = t_shapes[_first_spec(entry['teacher'])]
        for c in entry['cross']:  # before pairing: a cut called more often than the head has levels
            if len(outputs) != len(t_shapes[c['at']]):
                raise DistillConfigError(f"{what}: the teacher's cut {c['at']} has {len(t_shapes[c['at']])} levels "
                                         f"but its outputs {_first_spec(entry['teacher'])} {len(outputs)}: cut at a "
                                         'sublayer that runs once per head level')
        per_cut = [pair_levels(s_shapes[c['student']], t_shapes[c['at']], probe_size, entry['levels'],
                               f"{what}, cross {c['student']} -> {c['at']}") for c in entry['cross']]
    except PairingError as err:
        raise DistillConfigError(str(err)) from None
    for pairs in per_cut:
        if [(p.student_level, p.teacher_level) for p in pairs] != \
                [(p.student_level, p.teacher_level) for p in per_cut[0]]:
            raise DistillConfigError(f"{what}: the cuts {entry['cross']} pair different levels; every cut must "
                                     'run once per head level on both models')
    return [(LevelPair(c.student_level, c.teacher_level, outputs[c.teacher_level], outputs[c.teacher_level]),
             [pairs[i] for pairs in per_cut]) for i, c in enumerate(per_cut[0])]


def _whole_pairs(entry: dict, s_shapes: dict, t_shapes: dict) -> List[Tuple[LevelPair, list]]:
    """The one term of a ``whole_output`` entry: level 0 of both sides, shapes of its first tensor."""
    s, t = _first_spec(entry['student']), _first_spec(entry['teacher'])
    return [(LevelPair(0, 0, s_shapes[s][0], t_shapes[t][0]), [])]


def _whole_shapes(entry: dict, s_shapes: dict, t_shapes: dict) -> Tuple[dict, dict]:
    """``({name: student shape}, {name: teacher shape})`` of a ``whole_output`` entry at the probe."""
    return ({k: tuple(s_shapes[v][0]) for k, v in entry['student'].items()},
            {k: tuple(t_shapes[v][0]) for k, v in entry['teacher'].items()})


def _check_tensor_names(entry: dict, cls: type, what: str) -> None:
    """The entry gives what the loss class declares it receives: one tap per side, or a mapping naming
    exactly its :attr:`~ppdistill.losses.base.DistillLoss.tensor_names`."""
    names, spec = cls.tensor_names, entry['student']
    if names is None and isinstance(spec, dict):
        raise DistillConfigError(f'{what}: {cls.__name__} takes one tap per side (student: <role or sublayer>), '
                                 f'got a mapping naming {list(spec)}')
    if names is not None and (not isinstance(spec, dict) or set(spec) != set(names)):
        got = f'a mapping naming {list(spec)}' if isinstance(spec, dict) else repr(spec)
        wanted = ', '.join(f'{n}: <tap>' for n in names)
        raise DistillConfigError(f'{what}: {cls.__name__} needs student: {{{wanted}}} (a mapping naming one tap '
                                 f'per tensor), got {got}')


def _check_multi(entry: dict, s_shapes: dict, t_shapes: dict, what: str, whole: bool = False) -> None:
    """A multi-tensor entry: same names on both sides, and every name with the same level count per side
    (levels pair by stride on the first name, so the others must line up with it); the tensors of a
    ``whole`` (:attr:`~ppdistill.losses.base.DistillLoss.whole_output`) loss: one per tap and side."""
    if not isinstance(entry['student'], dict) and not isinstance(entry['teacher'], dict):
        return
    if not (isinstance(entry['student'], dict) and isinstance(entry['teacher'], dict)) or \
            list(entry['student']) != list(entry['teacher']):
        raise DistillConfigError(f"{what}: student and teacher must name the same tensors, got "
                                 f"{entry['student']!r} and {entry['teacher']!r}")
    for side, spec, shapes in (('student', entry['student'], s_shapes),
                               ('teacher', entry['teacher'], t_shapes)):
        if whole:
            bad = {k: shapes[v] for k, v in spec.items() if len(shapes[v]) != 1}
            if bad:
                raise DistillConfigError(f"{what}: each {side} tap must give one tensor per forward (the loss takes "
                                         f"its tensors whole), got {bad}")
            continue
        bad = {k: shapes[v] for k, v in spec.items() if any(len(shape) != 4 for shape in shapes[v])}
        if bad:
            raise DistillConfigError(f"{what}: {side} tensors must be [N, C, H, W] maps, got {bad}")
        counts = {k: len(shapes[v]) for k, v in spec.items()}
        if len(set(counts.values())) > 1:
            raise DistillConfigError(f"{what}: the {side}'s tensors must have the same number of levels, got "
                                     + ', '.join(f'{k} ({spec[k]}): {n}' for k, n in counts.items()))


def loss_class(name: str) -> type:
    """A registered loss class by name (e.g. ``MGDLoss``)."""
    entry = global_config.get(name)
    if not isinstance(entry, SchemaDict):
        known = sorted(k for k, v in global_config.items()
                       if isinstance(v, SchemaDict) and k.endswith('Loss') and 'ppdistill' in
                       getattr(v.pymodule, '__name__', ''))
        raise DistillConfigError(f"unknown distill loss type '{name}'; ppdistill losses: {', '.join(known)}")
    cls = getattr(entry.pymodule, name)
    if not (isinstance(cls, type) and issubclass(cls, DistillLoss)):
        raise DistillConfigError(f"'{name}' is registered with ppdet but is not a distill loss: derive it from "
                                 'ppdistill.losses.DistillLoss (or FeatureLoss), whose docstring is the contract')
    return cls


def _make_loss(cls: type, pair: LevelPair, args: dict, what: str, num_levels: int,
               channels: Tuple[Channels, Channels]) -> nn.Layer:
    """One loss module for one level pair, constructed as :class:`~ppdistill.losses.base.DistillLoss`
    specifies: ``channels`` ``(Cs, Ct)`` (``{name: C}`` each for a multi-tensor loss; ``{name: shape}`` each,
    passed as ``student_shapes``/``teacher_shapes``, for a ``whole_output`` loss), the entry's ``args``,
    and ``level``/``num_levels`` for a ``per_level`` loss."""
    kind = 'shapes' if cls.whole_output else 'channels'
    filled = {f'student_{kind}': channels[0], f'teacher_{kind}': channels[1]}
    if cls.per_level:
        filled.update(level=pair.student_level, num_levels=num_levels)
    taken = sorted(set(args) & set(filled))
    if taken:
        raise DistillConfigError(f'{what}: args {taken} are set by the distiller from the level pair; remove them')
    kwargs = dict(args, **filled)
    for key in getattr(cls, '__shared__', ()):  # ppdet's convention: the model config's value (num_classes)
        if key not in kwargs and key in global_config:
            kwargs[key] = global_config[key]
    # the signature only names the accepted arguments in the error for a misspelt one
    params = inspect.signature(cls).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            accepted = [p for p in params if p not in filled and p != 'self']
            raise DistillConfigError(f"{what}: {cls.__name__} has no argument(s) {unknown}; it accepts {accepted}")
    try:
        return cls(**kwargs)
    except PPDistillError as err:  # e.g. output losses: teacher and student logits of different shapes
        raise DistillConfigError(f'{what}, student level {pair.student_level} {pair.student_shape} <- '
                                 f'teacher level {pair.teacher_level} {pair.teacher_shape}: {err}') from None
    except (ValueError, TypeError) as err:  # a loss's own argument check: name the key, no traceback
        text = str(err)
        # the key named in the message, else the value (float('abc')) or its type (float([1, 2]))
        keys = [k for k, v in kwargs.items() if re.search(rf'\b{re.escape(k)}\b', text)
                or (isinstance(v, str) and repr(v) in text)
                or (not isinstance(v, (int, float, str)) and f"'{type(v).__name__}'" in text)]
        bad = ', '.join(f'{k}={kwargs[k]!r}' for k in keys) if keys else f'one of {sorted(args)}'
        raise DistillConfigError(f'{what}: bad argument {bad}: {text}') from None


def _assignment_keys(loss: nn.Layer, what: str) -> Tuple[str, ...]:
    """The assignment keys a built loss reads: its instance's ``assignment_keys``, which may only narrow
    the class's declaration (:class:`~ppdistill.losses.base.DistillLoss`)."""
    keys, declared = tuple(loss.assignment_keys), type(loss).assignment_keys
    if set(keys) - set(declared):
        raise DistillConfigError(f'{what}: {type(loss).__name__} instance asks for assignment keys {keys} but its '
                                 f'class declares {declared}')
    return keys


def _reject_duplicates(entries: List[dict]) -> None:
    """Two terms with one logged key would overwrite each other: distinct names, no repeated level."""
    def describe(i: int) -> str:
        e = entries[i]
        return f"entry #{i} ({e['type']} on {e['student']} -> {e['teacher']}, name '{e['name']}')"
    first: Dict[str, int] = {}
    for i, e in enumerate(entries):
        levels = e['levels'] if isinstance(e['levels'], (list, tuple)) else []  # others: pair_levels' error
        if len({repr(v) for v in levels}) != len(levels):
            raise DistillConfigError(f"distill loss {describe(i)} repeats a level in levels: {levels}")
        if e['name'] in first:
            raise DistillConfigError(f"distill loss {describe(first[e['name']])} and {describe(i)} share the "
                                     "name; give each a distinct `name:` (it keys the logged terms)")
        first[e['name']] = i


def _resize_to(s: paddle.Tensor, t: paddle.Tensor) -> paddle.Tensor:
    """The student resized to the teacher's H, W (bilinear) when they differ."""
    if s.shape[-2:] != t.shape[-2:]:
        s = F.interpolate(s, size=t.shape[-2:], mode='bilinear', align_corners=False)
    return s


def _check_equal_channels(pair: LevelPair, channels: Tuple[Channels, Channels], loss: str, why: str,
                          what: str) -> None:
    """An ``equal_channels`` loss or a logit role: no align conv, so the pair's channels (every named
    tensor's) must be equal. ``why``: how the loss compares them, for the message."""
    student, teacher = ((channels[0], channels[1]) if isinstance(channels[0], dict)
                        else ({'': channels[0]}, {'': channels[1]}))
    differ = [n for n in student if student[n] != teacher[n]]
    if differ:
        detail = '; '.join(f"{n + ': ' if n else ''}student {student[n]} channels vs teacher {teacher[n]}"
                           for n in differ)
        raise DistillConfigError(
            f'{what}, student level {pair.student_level} {pair.student_shape} <- teacher level '
            f'{pair.teacher_level} {pair.teacher_shape}: {loss}: {detail}. They differ in channels, but {why} '
            '(no align conv): the head layouts (classes, anchors per cell) must be equal')


@register
class Distiller(nn.Layer):
    """Arch-agnostic teacher→student distillation layer.

    Args:
        student_model, teacher_model: built ppdet architectures (passed by :mod:`ppdistill.build`).
        student_arch, teacher_arch: their ``architecture`` names, which with the models' head classes select
            the tap presets (:func:`~ppdistill.presets.select_preset`).
        losses: list of entries ``{type, student, teacher, levels, weight, args, name}``: ``type`` a
            registered loss class; ``student``/``teacher`` a preset role (``fpn``) or an exact sublayer
            name; ``levels`` student level indices (default all that pair by stride); ``weight`` (default 1)
            multiplies every term and sub-term of the entry, or ``auto``: measured before training
            (:meth:`calibrate`, ``auto_weight``); ``args`` passed to
            the loss constructor with the channels of each level pair. A loss that needs several tensors
            per level takes a mapping ``{name: role or sublayer}`` as ``student`` (and ``teacher``), e.g.
            ``{conf: cls_logits, loc: box_reg}``: it gets ``{name: tensor}`` per side and its channels as
            ``{name: C}``; levels pair by stride on the first name, every name must have as many levels.
            ``cross: {student: <student cut tap>, at: <teacher cut tap, default the same>}`` (or a list of
            them, one per head branch, crossed together) makes a CrossKD entry: ``student``/``teacher``
            then name teacher outputs, compared between the teacher's head run on the student's cut
            features (levels paired by stride at the cut; a 1x1 adapter per level and cut where the widths
            differ, trained and saved as distill state) and the teacher's own run. Entries with the same
            ``cross`` and ``levels`` share one crossed teacher pass and its adapters (CrossKD's class and box
            terms). A cut must run once per head level and return one tensor; a model whose preset row gives
            ``no_cross_cut`` (PP-YOLOE: no valid cut) refuses ``cross`` with that reason.
        probe_size: side of the blank image used at build time to read tap shapes and strides.
        init_student: copy the teacher's neck/head tensors into the student (MGD's ``init_student``). All
            or nothing: the student's neck/head must have the teacher's names and shapes (the references'
            precondition); otherwise it is a build error, because copying only the tensors whose shapes
            happen to match leaves layers half teacher, half student (e.g. a BN's teacher statistics
            after the student's own convolution).
        distill_lr_mult: learning-rate multiplier for the distill modules' own parameters (align convs,
            MGD generators, FGD context blocks), applied by every paddle optimizer through the parameter's
            ``optimize_attr``. These layers have no normalisation after them, so they are not scale
            invariant like the student's conv+BN layers: a peak LR tuned for the student (AdamW 0.04 in
            the demo) moves them by a large fraction of their size every step. The references train them
            with the detector's SGD at 0.01.
        nonfinite: what a step whose distill loss is inf/NaN does: ``'error'`` (default) stops training
            naming the term; ``'skip'`` logs a warning and drops that step's distill loss (the student
            still trains on its own loss; every distill parameter gets a zero gradient).
        auto_weight: ``{target, batches}`` for the ``weight: auto`` entries (:mod:`ppdistill.auto_weight`):
            each gets the weight that makes its gradient on the student ``target`` (default 0.15) times
            the detection loss's, averaged over the first ``batches`` (default 4) training batches per
            process. Setting it with no ``weight: auto`` entry is a build error.
    """

    def __init__(self, student_model: nn.Layer = None, teacher_model: nn.Layer = None,
                 student_arch: str = None, teacher_arch: str = None, losses: Optional[list] = None,
                 probe_size: int = 320, init_student: bool = False, nonfinite: str = 'error',
                 distill_lr_mult: float = 1.0, auto_weight: Optional[dict] = None):
        super().__init__()
        if not float(distill_lr_mult) > 0:
            raise DistillConfigError(f'distill_lr_mult must be > 0, got {distill_lr_mult!r}')
        if nonfinite not in _NONFINITE_MODES:
            raise DistillConfigError(f'nonfinite: {nonfinite!r} is not one of {list(_NONFINITE_MODES)}')
        self.nonfinite = nonfinite
        if student_model is None or teacher_model is None:
            raise DistillConfigError('Distiller needs student_model and teacher_model: build it with '
                                     'ppdistill.build.build_distiller(cfg)')
        if not losses:
            raise DistillConfigError('no distill losses configured (losses: [...] is empty)')
        self.student_model = student_model
        self.teacher_model = teacher_model
        self.fast_teacher = None  # ppdistill.fast_teacher (teacher_mode: fast); never a sublayer
        for param in self.teacher_model.parameters():
            param.stop_gradient = True
            param.trainable = False
        student_arch = student_arch or type(student_model).__name__
        teacher_arch = teacher_arch or type(teacher_model).__name__
        student_preset = select_preset(student_arch, student_model)
        teacher_preset = select_preset(teacher_arch, teacher_model)
        if init_student:
            self._init_student_from_teacher(init_prefixes(student_preset))

        entries = [self._normalise(e, (student_preset, student_arch), (teacher_preset, teacher_arch))
                   for e in losses]
        _reject_duplicates(entries)
        auto_entries = [e['name'] for e in entries if e['auto']]
        if auto_weight is not None and not auto_entries:
            raise DistillConfigError('auto_weight is set but no loss entry has weight: auto; mark the entries to '
                                     'measure with weight: auto, or remove auto_weight')
        target, batches = auto_weight_settings(auto_weight)
        # a cross entry's student side is the teacher's own output on crossed features: a teacher tap
        self.student_taps = TapSet(student_model, [t for e in entries for t in (
            [c['student'] for c in e['cross']] if e['cross'] else _tap_specs(e['student']))], role='student')
        self.teacher_taps = TapSet(teacher_model, [t for e in entries for t in _tap_specs(e['teacher']) + (
            _tap_specs(e['student']) + [c['at'] for c in e['cross']] if e['cross'] else [])], role='teacher')
        s_shapes = probe_shapes(student_model, self.student_taps, probe_size)
        t_shapes = probe_shapes(teacher_model, self.teacher_taps, probe_size)

        modules, self._terms, crossings = [], [], {}
        for e in entries:
            what = f"{type(self).__name__}: loss '{e['name']}' ({e['type']} on {e['student']} -> {e['teacher']})"
            cls = loss_class(e['type'])
            whole = cls.whole_output
            if whole and (e['cross'] or e['levels'] is not None):
                raise DistillConfigError(f"{what}: {cls.__name__} takes its tensors whole (not per-level maps): "
                                         f"remove {'cross' if e['cross'] else 'levels'} from the entry")
            own_shapes = t_shapes if e['cross'] else s_shapes  # where the loss's student tensors come from
            _check_multi(e, own_shapes, t_shapes, what, whole)
            _check_tensor_names(e, cls, what)
            why = (None if whole else f'{cls.__name__} compares them element by element' if cls.equal_channels
                   else 'logits are compared class by class' if e['logits'] else None)
            num_levels = len(own_shapes[_first_spec(e['student'])])
            # entries with the same cuts and levels share one crossing (one teacher pass, one adapter set),
            # named after the first of them and owned by its loss modules
            crossing = repr((e['cross'], e['levels'])) if e['cross'] else None
            owner = crossing not in crossings
            crossings.setdefault(crossing, e['name'])
            for pair, cuts in (_whole_pairs(e, s_shapes, t_shapes) if whole
                               else _entry_pairs(e, s_shapes, t_shapes, probe_size, what)):
                channels = (_whole_shapes(e, s_shapes, t_shapes) if whole
                            else _multi_channels(e, pair, own_shapes, t_shapes, e['cross'] is not None)
                            if cls.tensor_names else (pair.student_channels, pair.teacher_channels))
                if why:
                    _check_equal_channels(pair, channels, cls.__name__, why, what)
                modules.append(_make_loss(cls, pair, e['args'], what, num_levels, channels))
                if cuts and owner:  # CrossKD: this level's adapter per cut, saved and trained with the loss
                    modules[-1].add_sublayer('cross_adapters', nn.LayerList(
                        [CrossAdapter(c.student_channels, c.teacher_channels) for c in cuts]))
                self._terms.append(_Term(f"distill_{e['name']}_l{pair.student_level}", e['student'],
                                         e['teacher'], pair, e['weight'], _assignment_keys(modules[-1], what),
                                         e['cross'] and {'name': crossings[crossing], 'cuts': e['cross'],
                                                         'levels': cuts, 'owner': owner},
                                         auto_entries.index(e['name']) if e['auto'] else None, whole,
                                         type(modules[-1]).replacements is not DistillLoss.replacements))
        self.distill_losses = nn.LayerList(modules)
        # weight: auto entries: their measured factors (distill state), None without any
        self.auto_weights = AutoWeights(auto_entries, target, batches) if auto_entries else None
        # first steps: warns once; an auto entry's value ratio says nothing about its (measured) pull
        self.watch = TermWatch.from_losses([t.key for t in self._terms], modules,
                                           calibrated=self.auto_weighted_terms())
        self._assignment = self._assignment_feed(student_preset.get('assignment'), student_arch)
        _keep_float32(self.distill_losses)
        if self.auto_weights is not None:
            _keep_float32(self.auto_weights)
        for param in self.distill_losses.parameters():
            param.optimize_attr['learning_rate'] = float(distill_lr_mult)
        logger.info('Distiller: ' + '; '.join(
            f"{t.key}: student {list(t.pair.student_shape[0 if t.whole else 1:])} <- teacher "
            f"{list(t.pair.teacher_shape[0 if t.whole else 1:])}"
            + (' (teacher head on student ' + ', '.join(f"{c['student']} at {c['at']}" for c in t.cross['cuts']) + ')'
               if t.cross else '')
            for t in self._terms) + f' (shapes at probe size {probe_size})')

    def _assignment_feed(self, row: Optional[dict], arch: str) -> Optional[Assignment]:
        """The reader of the student head's label assignment, if a term needs one (else None): a
        one-line build error when the student's preset row says nowhere where it comes from."""
        needing = [t for t in self._terms if t.assignment]
        if not needing:
            return None
        if not row:
            t = needing[0]
            raise DistillConfigError(
                f"{t.key}: the loss reads the student head's label assignment ({', '.join(t.assignment)}), but the "
                f"preset of architecture '{arch}' has no assignment row (no assigner or reader target is known for "
                'this head): set normalize: locations (LDLoss: ld_weight: 0 and kd_weight: 0), or add an '
                'assignment row to ppdistill/presets.py')
        try:
            assignment = Assignment(self.student_model, row)
        except PPDistillError as err:
            raise DistillConfigError(f"student preset '{arch}': {err}") from None
        for t in needing:
            lacking = [k for k in t.assignment if k not in assignment.keys]
            if lacking:
                raise DistillConfigError(
                    f"{t.key}: the loss reads {', '.join(lacking)} from the student head's label assignment, but the "
                    f"preset of architecture '{arch}' reads the assignment from the batch ({row}), which has "
                    f"{', '.join(assignment.keys)} only (the assigner's soft scores are not in it): use normalize: "
                    'positives')
        return assignment

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
        unknown = set(entry) - {'type', 'student', 'teacher', 'levels', 'weight', 'args', 'name', 'cross'}
        if unknown:
            raise DistillConfigError(f"distill loss entry {entry['type']}: unknown keys {sorted(unknown)}")
        names = loss_class(entry['type']).tensor_names
        student = entry.get('student', 'fpn')
        cross = entry.get('cross')
        cuts = [cross] if isinstance(cross, dict) else cross
        if cross is not None and (not isinstance(cuts, list) or not cuts or not all(
                isinstance(c, dict) and not set(c) - {'student', 'at'} and isinstance(c.get('student'), str)
                for c in cuts)):
            raise DistillConfigError(f"distill loss entry {entry['type']}: cross must be {{student: <student cut "
                                     f"tap>, at: <teacher cut tap, default the same>}} or a list of them (one per "
                                     f"head branch), got {cross!r}")
        for preset, arch in ((student_preset, teacher_preset) if cross is not None else ()):
            if preset.get('no_cross_cut'):
                raise DistillConfigError(f"distill loss entry {entry['type']}: CrossKD (cross:) cannot run on "
                                         f"architecture '{arch}': {preset['no_cross_cut']}")
        try:
            # crossed outputs are the teacher's: a cross entry's student side names teacher taps
            student_tap = _resolve_side(student, *(teacher_preset if cross else student_preset))
            teacher_tap = _resolve_side(entry.get('teacher', student), *teacher_preset)
            if cross:
                cross = [{'student': resolve_tap(c['student'], *student_preset),
                          'at': resolve_tap(c.get('at', c['student']), *teacher_preset)} for c in cuts]
        except KeyError as err:
            raise DistillConfigError(err.args[0]) from None
        if names and len(names) == 1:  # a loss naming one tensor takes a bare tap as that name
            student_tap, teacher_tap = ({names[0]: v} if isinstance(v, str) else v for v in (student_tap, teacher_tap))
        weight = entry.get('weight', 1.0)
        auto = weight == AUTO
        try:  # a YAML 1e-3 (no dot) arrives as a string
            weight = 1.0 if auto else float(weight) if not isinstance(weight, bool) else None
        except (TypeError, ValueError):
            weight = None
        if weight is None:
            raise DistillConfigError(f"distill loss entry {entry['type']}: weight must be a number or {AUTO} (measured "
                                     f"from the gradients before training), got {entry['weight']!r}")
        if not math.isfinite(weight) or weight < 0:  # a negative weight pushes the student away from the teacher
            raise DistillConfigError(f"distill loss entry {entry['type']}: weight must be a finite number >= 0 (or "
                                     f"{AUTO}), got {entry['weight']!r}")
        return {
            'type': entry['type'],
            'student': student_tap,
            'teacher': teacher_tap,
            'levels': entry.get('levels'),
            'weight': weight,
            'auto': auto,
            'args': dict(entry.get('args') or {}),
            'name': entry.get('name') or entry['type'].lower().replace('loss', '') or 'kd',
            'logits': any(isinstance(v, str) and v in LOGIT_ROLES for v in (student, entry.get('teacher', student))),
            'cross': cross,
        }

    def _init_student_from_teacher(self, prefixes: Sequence[str]) -> None:
        student_state = self.student_model.state_dict()
        teacher_state = self.teacher_model.state_dict()
        candidates = [k for k in student_state if any(k.startswith(p + '.') for p in prefixes)]
        differ = [k for k in candidates
                  if k not in teacher_state or list(teacher_state[k].shape) != list(student_state[k].shape)]
        if not candidates or differ:
            k = differ[0] if differ else None
            example = ('' if k is None else f"; e.g. {k}: student {list(student_state[k].shape)}, teacher "
                       + (str(list(teacher_state[k].shape)) if k in teacher_state else 'has no such tensor'))
            raise DistillConfigError(
                f"init_student: true needs the student's {'/'.join(prefixes)} to equal the teacher's, but "
                f'{len(differ)} of {len(candidates)} tensors differ in name or shape{example}. Copying only '
                'the matching ones would mix teacher and student layers: set init_student: false')
        for k in candidates:
            student_state[k].set_value(teacher_state[k])
        logger.info(f"init_student: copied all {len(candidates)} {'/'.join(prefixes)} tensors from the teacher")

    # -- parameters: never the teacher's ------------------------------------------------------------
    def named_parameters(self, prefix: str = '', include_sublayers: bool = True, **kwargs):
        skip = (prefix + '.' if prefix else '') + 'teacher_model.'
        for name, param in super().named_parameters(prefix=prefix, include_sublayers=include_sublayers,
                                                    **kwargs):
            if not name.startswith(skip):
                yield name, param

    def parameters(self, include_sublayers: bool = True) -> List[paddle.Tensor]:
        return [p for _, p in self.named_parameters(include_sublayers=include_sublayers)]

    def distill_state_dict(self, state: Optional[Dict[str, paddle.Tensor]] = None) -> Dict[str, paddle.Tensor]:
        """State of the distill modules alone (saved beside the student checkpoint): the loss modules' tensors
        under their names in ``distill_losses`` and, with ``weight: auto`` entries, their measured weights
        as ``auto_weights.factors``. Read from ``state`` (a state dict of the whole distiller, e.g. the raw
        weights under EMA) when given, else from the live distiller."""
        state = self.state_dict() if state is None else state
        losses = 'distill_losses.'
        return {k[len(losses):] if k.startswith(losses) else k: v for k, v in state.items()
                if k.startswith((losses, 'auto_weights.'))}

    # -- weight: auto -------------------------------------------------------------------------------
    def auto_weighted_terms(self) -> List[str]:
        """Keys of the terms whose weight is measured (``weight: auto`` entries), config order."""
        return [t.key for t in self._terms if t.auto is not None]

    def calibrate(self, batches: Sequence[dict]) -> Dict[str, float]:
        """Measure and set the weight of every ``weight: auto`` entry (:mod:`ppdistill.auto_weight`); returns
        ``{entry name: weight}`` (empty without auto entries).

        ``batches``: this process's first training batches. On each, a training forward with the auto
        entries at weight 1 and the gradients of the detection loss and of each auto entry on the
        student's parameters (``paddle.grad``: nothing is accumulated into ``.grad`` and no parameter
        changes). With several processes the measurements are all-reduced (every rank must call this),
        so every rank sets the same weights. The forwards' effect on the student's and the distill modules'
        state (BatchNorm running statistics) is undone, so training starts from the state it had.
        One log line per entry gives the measured ratio and the weight.
        """
        auto = self.auto_weights
        if auto is None:
            return {}
        if not batches:
            raise PPDistillError('weight: auto needs at least one training batch to measure on')
        auto.reset()  # the entries at weight 1 while measuring
        groups = [[t.key for t in self._terms if t.auto == i] for i in range(len(auto.entries))]
        # BatchNorm statistics are non-trainable parameters in paddle, not buffers: keep the whole state
        kept = [(v, v.clone()) for layer in (self.student_model, self.distill_losses)
                for v in layer.state_dict().values()]
        training = self.training
        self.train()
        try:
            sums = measure_ratios(self.inspect, groups, batches, student_parameters(self))
        finally:
            for buffer, value in kept:
                buffer.set_value(value)
            if training:
                self.train()
            else:
                self.eval()
        totals = mean_over_ranks(sums)
        factors, ratios = weights_from_ratios(totals, auto.entries, auto.target)
        auto.set(factors)
        if dist.get_world_size() < 2 or dist.get_rank() == 0:
            for name, factor, ratio, keys in zip(auto.entries, factors, ratios, groups):
                logger.info(f"weight: auto: loss '{name}' ({len(keys)} level term(s)): its gradient on the student is "
                            f"{ratio:.4g}x the detection loss's at weight 1 (mean over {int(totals[-2])} batches) "
                            f'-> weight {factor:.6g} for {auto.target:g}x')
        return auto.values()

    # -- forward ------------------------------------------------------------------------------------
    def crossed_terms(self) -> List[str]:
        """Keys of the terms whose step runs the teacher model again (CrossKD ``cross:`` entries on student
        features; losses with :meth:`~ppdistill.losses.base.DistillLoss.replacements`), config order."""
        return [term.key for term in self._terms if term.cross or term.rerun]

    def term_losses(self) -> Dict[str, nn.Layer]:
        """The loss module of every configured term by its key (``distill_<name>_l<level>``), config order."""
        return {term.key: loss for term, loss in zip(self._terms, self.distill_losses)}

    def teacher_features(self, inputs: dict) -> Dict[str, List[paddle.Tensor]]:
        """The teacher's tapped tensors for ``inputs`` as a training step computes them: ``{tap spec: one
        tensor per level}`` (``[N, Ct, H, W]`` for a feature map): from :attr:`fast_teacher` when set
        (:mod:`ppdistill.fast_teacher`), else :meth:`eager_teacher_features`."""
        if self.fast_teacher is not None:
            return self.fast_teacher(inputs)
        return self.eager_teacher_features(inputs)

    def eager_teacher_features(self, inputs: dict) -> Dict[str, List[paddle.Tensor]]:
        """:meth:`teacher_features` from the whole teacher in eval mode, without gradient, stopping as soon
        as every tap has fired."""
        # Eval mode for the whole teacher (not a list of layer types): no stochastic layer of any kind
        # and running BN statistics. For the taps we support (necks, head convs) eval and train mode
        # compute the same tensors; see tests/test_distiller.py for RetinaNet and PicoDet.
        self.teacher_model.eval()
        try:
            with paddle.no_grad(), self.teacher_taps.record(stop_early=True):
                self.teacher_model(dict(inputs))
            return {spec: self.teacher_taps.levels(spec) for spec in self.teacher_taps.specs}
        finally:
            self.teacher_taps.clear()

    def _student_forward(self, inputs: dict) -> Tuple[dict, Dict[str, List[paddle.Tensor]]]:
        """The student's own outputs (in its current mode) and its tapped tensors per tap spec; the head's
        label assignment is recorded on the side when a term reads it (:meth:`_add_assignment`)."""
        assignment = self._assignment.record() if self._assignment else contextlib.nullcontext()
        try:
            with self.student_taps.record(), assignment:
                outputs = dict(self.student_model(inputs))
            return outputs, {spec: self.student_taps.levels(spec) for spec in self.student_taps.specs}
        finally:
            self.student_taps.clear()

    def _add_assignment(self, pairs: Dict[str, tuple], student: Dict[str, list], crossed: Dict[str, dict],
                        inputs: dict) -> None:
        """Add this step's label assignment to the student mapping of every term that reads it:
        ``pos`` ``[N, 1, H, W]`` (the assigner's positives sliced to the term's level, levels in head
        order from the term's first student tap), ``num_pos`` and ``assigned_scores_sum`` (scalars, all
        levels)."""
        needing = [t for t in self._terms if t.assignment]
        if not needing:
            return
        def levels(term: _Term) -> Tuple[List[paddle.Tensor], int]:
            source, level = self._student_source(term, student, crossed)
            return source[next(iter(term.student_tap.values()))], level
        read = self._assignment.read(inputs, int(levels(needing[0])[0][0].shape[1]))
        masks = {}
        for term in needing:
            tensors, level = levels(term)
            s_map = pairs[term.key][0]
            if 'pos' in term.assignment:
                if id(tensors) not in masks:
                    masks[id(tensors)] = level_masks(read['positive'], [t.shape for t in tensors])
                s_map['pos'] = resize_mask(masks[id(tensors)][level], s_map[next(iter(s_map))].shape[-2:])
            s_map.update({k: read[k] for k in term.assignment if k != 'pos'})

    def _rerun(self, side: str, given: Dict[str, Dict[int, paddle.Tensor]], inputs: dict,
               grad: bool = True) -> Dict[str, List[paddle.Tensor]]:
        """One more forward of the ``side`` model (``'student'``/``'teacher'``) in which the sublayers of the
        tap specs in ``given`` return the given tensors (``{spec: {level: tensor}}``,
        :meth:`~ppdistill.taps.TapSet.replace`) instead of their own outputs; it stops once every tap of that
        model has fired and returns them, ``{tap spec: one tensor per level}``. The teacher runs in eval mode,
        the student in its current mode; ``grad=False`` runs it without gradient. CrossKD's crossing and the
        second runs a loss asks for (:meth:`_rerun_terms`) are both this one pass."""
        model, taps = ((self.teacher_model, self.teacher_taps) if side == 'teacher'
                       else (self.student_model, self.student_taps))
        if side == 'teacher':
            model.eval()
        try:
            with (contextlib.nullcontext() if grad else paddle.no_grad()), taps.record(stop_early=True), \
                    contextlib.ExitStack() as stack:
                for spec, levels in given.items():
                    stack.enter_context(taps.replace(spec, levels))
                model(dict(inputs))
            return {spec: taps.levels(spec) for spec in taps.specs}
        finally:
            taps.clear()

    def _crossed_features(self, inputs: dict, student: Dict[str, list],
                          teacher: Dict[str, list]) -> Dict[str, Dict[str, List[paddle.Tensor]]]:
        """CrossKD: per crossing, the teacher's tapped outputs when its cut sublayers return the student's
        cut features instead of their own (:class:`~ppdistill.crossing.CrossAdapter`: 1x1 conv where widths
        differ, then the teacher's per-channel statistics at the cut). ``{crossing: {tap spec: one tensor
        per level}}``. One more, partial teacher forward per crossing (:meth:`_rerun`), in eval mode and *in*
        the graph: the teacher's parameters take no gradient, the student's features before the cut do."""
        crossed = {}
        for name in dict.fromkeys(t.cross['name'] for t in self._terms if t.cross):
            members = [(t, m) for t, m in zip(self._terms, self.distill_losses)
                       if t.cross and t.cross['name'] == name and t.cross['owner']]
            cuts = members[0][0].cross['cuts']
            levels = [{} for _ in cuts]  # per cut: {teacher level: adapted student features}
            for t, m in members:
                for i, (cut, pair, adapter) in enumerate(zip(cuts, t.cross['levels'], m.cross_adapters)):
                    own = _float32(teacher[cut['at']][pair.teacher_level])
                    levels[i][pair.teacher_level] = adapter(
                        _resize_to(_float32(student[cut['student']][pair.student_level]), own), own)
            crossed[name] = self._rerun('teacher', {cut['at']: given for cut, given in zip(cuts, levels)}, inputs)
        return crossed

    def _rerun_terms(self, inputs: dict, pairs: Dict[str, tuple]) -> None:
        """For every term whose loss asks for second runs (:meth:`~ppdistill.losses.base.DistillLoss.
        replacements`): run the named models again with the given tensors in place of the named taps'
        outputs (:meth:`_rerun`; the teacher without gradient) and make those runs' taps the term's inputs
        in ``pairs`` (float32, the teacher's detached)."""
        for term, loss in zip(self._terms, self.distill_losses):
            if not term.rerun:
                continue
            s_map, t_map = pairs[term.key]
            given = loss.replacements(s_map, t_map)
            if given is None:
                continue
            new = []
            for side, specs, own in (('student', term.student_tap, s_map), ('teacher', term.teacher_tap, t_map)):
                if side not in given:
                    new.append(own)
                    continue
                unknown = sorted(set(given[side]) - set(specs))
                if unknown:
                    raise PPDistillError(f'{term.key}: {type(loss).__name__}.replacements names {unknown}, which are '
                                         f'not among its tensors {list(specs)}')
                run = self._rerun(side, {specs[k]: {0: v} for k, v in given[side].items()}, inputs,
                                  grad=side == 'student')
                new.append({k: _float32(run[v][0] if side == 'student' else run[v][0].detach())
                            for k, v in specs.items()})
            pairs[term.key] = tuple(new)

    @staticmethod
    def _student_source(term: _Term, student: Dict[str, list],
                        crossed: Dict[str, dict]) -> Tuple[Dict[str, list], int]:
        """Where a term's student tensors come from, and their level: the student's taps, or for a cross
        term the teacher's outputs on the crossed features (teacher level)."""
        if term.cross:
            return crossed[term.cross['name']], term.pair.teacher_level
        return student, term.pair.student_level

    def _term_inputs(self, student: Dict[str, list], teacher: Dict[str, list],
                     crossed: Optional[Dict[str, dict]] = None) -> Dict[str, tuple]:
        """``{term key: (student, teacher)}`` from the tapped tensors, float32: ``[N, Cs, H, W]`` and
        ``[N, Ct, H, W]`` (for a multi-tensor term, ``{name: tensor}`` per side); the teacher detached, the
        student resized to the teacher's ``H, W`` where they differ. A cross term's student side is its
        crossed outputs (``crossed``, :meth:`_crossed_features`)."""
        def pair(s_spec: str, t_spec: str, term: _Term) -> tuple:
            t = _float32(teacher[t_spec][term.pair.teacher_level].detach())
            source, level = self._student_source(term, student, crossed or {})
            s = _float32(source[s_spec][level])
            return (s if term.whole else _resize_to(s, t)), t

        pairs = {}
        for term in self._terms:
            if isinstance(term.student_tap, dict):  # multi-tensor loss: {name: tensor} per side
                both = {k: pair(term.student_tap[k], term.teacher_tap[k], term) for k in term.student_tap}
                pairs[term.key] = ({k: v[0] for k, v in both.items()}, {k: v[1] for k, v in both.items()})
            else:
                pairs[term.key] = pair(term.student_tap, term.teacher_tap, term)
        return pairs

    def distill_terms(self, inputs: dict, term_inputs: Mapping[str, tuple]) -> Dict[str, paddle.Tensor]:
        """Weighted loss per configured term from its ``(student, teacher)`` inputs (``{term key: pair}``,
        as :attr:`Inspection.term_inputs`).

        Every loss runs in float32 outside autocast, whatever the AMP level: the squared-error sums over
        a P3 level (~10^7 elements) overflow float16. A loss returning sub-terms (a dict) also yields
        ``<term key>_<sub_term>`` entries (weighted, logged by ppdet like any output); the term itself is
        their sum. A ``weight: auto`` entry's terms are weighted by its measured weight, or by 1 until it is
        measured (:meth:`calibrate`).
        """
        terms = {}
        # weight: auto entries: their measured weights, or 1 until measured (what calibrate() measures)
        measured = self.auto_weights is not None and self.auto_weights.measured()
        with paddle.amp.auto_cast(enable=False):
            for term, loss in zip(self._terms, self.distill_losses):
                s, t = term_inputs[term.key]
                value = loss(s, t, inputs)
                weight = self.auto_weights.factors[term.auto] if measured and term.auto is not None else term.weight
                if isinstance(value, dict):
                    terms.update({f'{term.key}_{sub}': v * weight for sub, v in value.items()})
                terms[term.key] = loss_total(value, f'{type(loss).__name__} ({term.key})') * weight
        return terms

    def inspect(self, inputs: dict) -> Inspection:
        """One step's teacher and student forward and every distill term, computed as :meth:`forward`
        computes them in training, returned instead of summed (see :class:`Inspection`).

        The student runs in the distiller's current mode: after ``train()`` through its own loss path
        (``det_loss`` is its ``loss``), after ``eval()`` to its predictions (``det_loss`` is None; the
        terms are still computed, so GT-aware losses need ``gt_bbox`` in ``inputs``). The teacher always
        runs as in training. Gradients flow as in training unless the call is inside ``paddle.no_grad()``.
        Nothing is kept on the distiller: taps are cleared before it returns.
        """
        teacher = self.teacher_features(inputs)
        outputs, student = self._student_forward(inputs)
        crossed = self._crossed_features(inputs, student, teacher)
        pairs = self._term_inputs(student, teacher, crossed)
        self._add_assignment(pairs, student, crossed, inputs)
        self._rerun_terms(inputs, pairs)
        terms = self.distill_terms(inputs, pairs)
        return Inspection(terms=terms, term_inputs=pairs, student_taps=student, teacher_taps=teacher,
                          outputs=outputs, det_loss=outputs.get('loss'), crossed=crossed)

    def _checked_sum(self, terms: Dict[str, paddle.Tensor]) -> paddle.Tensor:
        """Sum of the terms, or (``nonfinite: skip``) a zero that still reaches every distill parameter.

        One ``isfinite`` over the stacked terms and one host sync per step; the per-term look-up runs
        only when something is already wrong.
        """
        stacked = paddle.stack([paddle.reshape(v, []) for v in terms.values()])
        finite = paddle.isfinite(stacked)
        if bool(paddle.all(finite)):
            return paddle.sum(stacked)
        bad = [(t, float(v)) for t, v, ok in zip(self._terms, stacked.numpy(), finite.numpy()) if not ok]
        what = ', '.join(f'{t.key} = {v} (student level {t.pair.student_level} <- teacher level '
                         f'{t.pair.teacher_level})' for t, v in bad)
        if self.nonfinite == 'error':
            raise NonFiniteDistillLoss(
                f'non-finite distill loss term {what}; training stopped (lower the loss weight or the '
                'learning rate, check the teacher, or set nonfinite: skip in the distill config to skip '
                'such steps with a warning)')
        logger.warning(f'skipping the distill loss of this step: {what}')
        params = self.distill_losses.parameters()
        # DataParallel expects a gradient for every parameter on every rank: give them zeros.
        return paddle.add_n([p.sum() for p in params]) * 0.0 if params else paddle.zeros([])

    def forward(self, inputs: dict):
        if not self.training:
            return self.student_model(inputs)
        if self.auto_weights is not None and not self.auto_weights.measured():
            raise PPDistillError(f'the weight: auto entries {self.auto_weights.entries} are not measured yet: call '
                                 'Distiller.calibrate(<first training batches>) before training (DistillTrainer '
                                 'does it before the first step)')
        seen = self.inspect(inputs)
        outputs, terms = seen.outputs, seen.terms
        distill_loss = self._checked_sum({t.key: terms[t.key] for t in self._terms})  # sub-terms: logged only
        self.watch.update(outputs['loss'], [terms[t.key] for t in self._terms])
        outputs.update(terms)
        outputs['distill_loss'] = distill_loss
        outputs['loss'] = outputs['loss'] + distill_loss
        return outputs
