"""The loss-author contract (:class:`DistillLoss`) and the common base of feature losses (:class:`FeatureLoss`).

A distillation method is one file in ``ppdistill/losses/`` holding a ``@register``-ed subclass of
:class:`DistillLoss`, imported in ``ppdistill/losses/__init__.py`` (importing ppdistill then registers it with
ppdet, so a config can name it as ``type:``). What the distiller passes to it and expects back is written in
:class:`DistillLoss`, and what a loss needs beyond that is declared in its class attributes.
"""
import inspect
import math
from typing import Dict, Optional, Tuple, Union

import paddle
import paddle.nn as nn

from ..errors import PPDistillError

__all__ = ['DistillLoss', 'FeatureLoss', 'torch_default_conv2d', 'loss_total', 'LossValue', 'ASSIGNMENT_KEYS']

LossValue = Union[paddle.Tensor, Dict[str, paddle.Tensor]]

# What the distiller can add to a loss's student mapping from the student head's own label assignment.
ASSIGNMENT_KEYS = ('pos', 'num_pos', 'assigned_scores_sum')


class DistillLoss(nn.Layer):
    """Base class of every distill loss: the contract between a loss and the distiller.

    **Construction** — one instance per configured level pair (it may own trainable layers: align convs,
    generators; they are saved beside the student and trained with ``distill_lr_mult``)::

        cls(student_channels, teacher_channels, **args[, level=i, num_levels=L])
        cls(student_shapes, teacher_shapes, **args)        # a whole_output loss

    * ``student_channels``/``teacher_channels``: ``Cs``/``Ct`` of the pair's tensors (ints), or for a loss
      with :attr:`tensor_names` one ``{name: C}`` mapping per side;
    * ``args``: the config entry's ``args:`` mapping, verbatim (an argument the constructor does not accept
      is a build error listing the accepted ones; a ``ValueError``/``TypeError``/``PPDistillError`` raised
      here becomes a one-line build error naming the entry, the level pair and both shapes);
    * ``level``, ``num_levels``: only when :attr:`per_level` is true — the student level index of this
      pair and the student's level count (for per-level settings such as anchor lists).

    **Forward** — ``loss(student, teacher, inputs)`` once per training step:

    * ``student``: ``[N, Cs, H, W]`` float32, resized (bilinear) to the teacher's ``H, W``, in the graph;
    * ``teacher``: ``[N, Ct, H, W]`` float32, detached (a constant);
    * with :attr:`tensor_names`: ``{name: tensor}`` per side, each as above; the student mapping also holds
      the :attr:`assignment_keys` the instance declares;
    * ``inputs``: ppdet's batch dict (``image`` ``[N, 3, H_in, W_in]``, ``gt_bbox``, ``im_shape``, ...) for
      GT-aware losses; it runs in float32 outside autocast.

    It returns a scalar Tensor, or a dict ``{sub_term: weighted scalar}`` whose sum (:func:`loss_total`) is
    the loss; the distiller multiplies by the entry's ``weight``, logs the term as
    ``distill_<name>_l<level>`` (and each sub-term as ``distill_<name>_l<level>_<sub_term>``) and adds it
    into ``loss``.

    **Class attributes** (checked when the class is defined):

    * :attr:`equal_channels` — compare student and teacher channel by channel with no align conv (logits):
      every level pair (every named tensor) must have equal channels, else a build error;
    * :attr:`per_level` — the constructor takes ``level`` and ``num_levels``;
    * :attr:`tensor_names` — ``None``: one tensor per side (``student: fpn``); a tuple of names: a mapping
      per side naming exactly these tensors (``student: {conf: cls_logits, loc: box_reg}``). A loss naming
      one tensor also accepts a bare tap per side (``student: cls_logits``), taken as that name;
    * :attr:`assignment_keys` — what the loss reads from the student head's own label assignment (dense
      heads: the paper normalisers, LD's main region), added by the distiller to the *student* mapping
      (so it needs :attr:`tensor_names`), detached:

      - ``pos``: ``[N, 1, H, W]`` float, 1 at this level's positive locations (the assigner's labels
        sliced to the level), else 0;
      - ``num_pos``: scalar float, the batch's positives over *all* levels, averaged over ranks, ``>= 1``;
      - ``assigned_scores_sum``: scalar float, the sum of the assigner's soft scores ``[N, A, C]`` over the
        batch, averaged over ranks, ``>= 1`` (PP-YOLOE's and PicoDet's class-loss divisor; only an
        assignment read from assigner taps gives it).

      The class attribute lists every key the loss may read; an instance may narrow it in ``__init__``
      to what its arguments need (``()`` when none). The distiller reads the instance's value: a
      non-empty one on an architecture whose preset row has no ``assignment`` is a build error.
    * :attr:`whole_output` — the tensors are not per-level maps (a DETR decoder's ``[L, N, Q, C]`` logits):
      each tap gives one tensor per side, taken whole: one term per entry (``_l0``), no pairing by stride,
      no resizing, no align conv, and the constructor gets ``student_shapes``/``teacher_shapes`` (``{name:
      shape}`` at the build-time probe: batch 1, eval mode) instead of the channels. It needs
      :attr:`tensor_names`.
    * :meth:`replacements` (``whole_output`` losses only) — the loss runs the models again with some tapped
      sublayers returning tensors it computes from this step's taps (KD-DETR's shared queries); its forward
      then receives the taps of those second runs (see :meth:`replacements`).
    """

    equal_channels: bool = False
    per_level: bool = False
    tensor_names: Optional[Tuple[str, ...]] = None
    assignment_keys: Tuple[str, ...] = ()
    whole_output: bool = False

    def replacements(self, student: Dict[str, paddle.Tensor],
                     teacher: Dict[str, paddle.Tensor]) -> Optional[Dict[str, Dict[str, paddle.Tensor]]]:
        """``None`` (the default): the loss compares this step's taps. Otherwise, from this step's tapped
        tensors (``{name: tensor}`` per side as :meth:`forward` gets them; the teacher's detached),
        ``{'student': {name: tensor}, 'teacher': {name: tensor}}``: the distiller runs each named model again
        (the student in its current mode and in the graph, the teacher in eval mode without gradient) with
        the sublayer tapped for ``name`` returning the given tensor instead of its own output
        (:meth:`~ppdistill.taps.TapSet.replace`, the mechanism CrossKD's crossing uses), and :meth:`forward`
        receives the taps of those runs (a side not named keeps this step's taps)."""
        return None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for flag in ('equal_channels', 'per_level', 'whole_output'):
            if not isinstance(getattr(cls, flag), bool):
                raise TypeError(f'{cls.__name__}.{flag} must be True or False, got {getattr(cls, flag)!r}')
        names = cls.tensor_names
        if names is not None and (not isinstance(names, tuple) or not names
                                  or not all(isinstance(n, str) for n in names)):
            raise TypeError(f'{cls.__name__}.tensor_names must be None or a non-empty tuple of names, '
                            f'got {names!r}')
        keys = cls.assignment_keys
        if not isinstance(keys, tuple) or set(keys) - set(ASSIGNMENT_KEYS):
            raise TypeError(f'{cls.__name__}.assignment_keys must be a tuple of {ASSIGNMENT_KEYS}, got {keys!r}')
        if keys and names is None:
            raise TypeError(f'{cls.__name__}.assignment_keys needs tensor_names: the assignment is added to the '
                            'student mapping')
        if cls.whole_output and names is None:
            raise TypeError(f'{cls.__name__}.whole_output needs tensor_names: its tensors are named per side')
        if cls.replacements is not DistillLoss.replacements and not cls.whole_output:
            raise TypeError(f'{cls.__name__}.replacements needs whole_output: a second run gives one tensor per tap')
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            needed = (['student_shapes', 'teacher_shapes'] if cls.whole_output else
                      ['student_channels', 'teacher_channels']) + (['level', 'num_levels'] if cls.per_level else [])
            missing = [n for n in needed if n not in params]
            if missing:
                raise TypeError(f'{cls.__name__}.__init__ must accept {missing} (see DistillLoss)')


def torch_default_conv2d(in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> nn.Conv2D:
    """``nn.Conv2D`` initialised as PyTorch's default ``nn.Conv2d`` (the MGD/FGD reference modules).

    PyTorch draws the weight with ``kaiming_uniform_(a=sqrt(5))`` and the bias from the same range:
    both ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = in_channels / groups * k * k``. Paddle's
    default (weight ``N(0, 2/fan_in)``, bias 0) starts a generator or align conv about 2.4x larger.
    """
    fan_in = in_channels // kwargs.get('groups', 1) * kernel_size * kernel_size
    bound = 1.0 / math.sqrt(fan_in)

    def attr() -> paddle.ParamAttr:
        return paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound))
    return nn.Conv2D(in_channels, out_channels, kernel_size, weight_attr=attr(), bias_attr=attr(), **kwargs)


def _check_scalar(value, what: str) -> None:
    if not isinstance(value, paddle.Tensor) or math.prod(value.shape) != 1:
        got = list(value.shape) if isinstance(value, paddle.Tensor) else type(value).__name__
        raise PPDistillError(f'{what} returned {got}; a distill loss returns a scalar Tensor or a dict '
                             '{sub_term: scalar Tensor} (see ppdistill.losses.base.DistillLoss)')


def loss_total(value: LossValue, what: str = 'a distill loss') -> paddle.Tensor:
    """The scalar a loss contributes: the value itself, or the sum of its weighted sub-terms when the loss
    returns a dict ``{sub_term: weighted scalar}`` (so the distiller can log each sub-term).

    Anything else (a per-image vector, a float, an empty dict) is a :class:`PPDistillError` naming ``what``.
    The check reads shapes only (no host sync)."""
    if isinstance(value, dict):
        if not value:
            raise PPDistillError(f'{what} returned an empty dict; it needs at least one sub-term')
        for sub, v in value.items():
            _check_scalar(v, f'{what} (sub-term {sub!r})')
        return paddle.add_n(list(value.values()))
    _check_scalar(value, what)
    return value


class FeatureLoss(DistillLoss):
    """Base class of a loss between one student and one teacher feature map (a :class:`DistillLoss`).

    Holds the optional 1x1 alignment conv used by MGD/FGD-style losses: when the channel counts differ,
    ``self.align = nn.Conv2D(student_channels, teacher_channels, 1)`` maps the student to the teacher's
    channels (PyTorch's default init, as the references' ``nn.Conv2d``); otherwise ``self.align`` is
    ``None``.

    Subclasses implement ``forward(student_feat, teacher_feat, inputs=None)`` returning a scalar Tensor, or
    a dict ``{sub_term: weighted scalar}`` whose sum (:func:`loss_total`) is the loss, where
    ``student_feat`` is ``[N, Cs, H, W]`` (already resized to the teacher's ``H, W`` by the caller),
    ``teacher_feat`` is ``[N, Ct, H, W]`` (a constant) and ``inputs`` is ppdet's batch dict.

    Args:
        student_channels: ``Cs``.
        teacher_channels: ``Ct``.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        student_channels, teacher_channels = int(student_channels), int(teacher_channels)
        if student_channels <= 0 or teacher_channels <= 0:
            raise ValueError(f'channel counts must be positive, got student={student_channels}, '
                             f'teacher={teacher_channels}')
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.align: Optional[nn.Conv2D] = None
        if student_channels != teacher_channels:
            self.align = torch_default_conv2d(student_channels, teacher_channels, kernel_size=1)

    def align_student(self, x: paddle.Tensor) -> paddle.Tensor:
        """Map a student feature ``[N, Cs, H, W]`` to ``[N, Ct, H, W]`` (identity if ``Cs == Ct``)."""
        return x if self.align is None else self.align(x)

    def check_shapes(self, student: paddle.Tensor, teacher: paddle.Tensor) -> None:
        """Raise ``ValueError`` unless ``student`` is ``[N, Cs, H, W]`` and ``teacher`` ``[N, Ct, H, W]``."""
        if student.ndim != 4 or teacher.ndim != 4:
            raise ValueError(f'expected 4-D [N, C, H, W] features, got student {list(student.shape)} '
                             f'and teacher {list(teacher.shape)}')
        s, t = list(student.shape), list(teacher.shape)
        if s[0] != t[0] or s[2:] != t[2:]:
            raise ValueError(f'student {s} and teacher {t} must share N, H and W '
                             '(resize the student before the loss)')
        if s[1] != self.student_channels or t[1] != self.teacher_channels:
            raise ValueError(f'expected {self.student_channels} student and {self.teacher_channels} '
                             f'teacher channels, got student {s} and teacher {t}')
