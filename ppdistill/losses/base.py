"""Common base of the feature-distillation losses."""
import math
from typing import Dict, Optional, Union

import paddle
import paddle.nn as nn

__all__ = ['FeatureLoss', 'torch_default_conv2d', 'loss_total']

LossValue = Union[paddle.Tensor, Dict[str, paddle.Tensor]]


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


def loss_total(value: LossValue) -> paddle.Tensor:
    """The scalar a loss contributes: the value itself, or the sum of its weighted sub-terms when the loss
    returns a dict ``{sub_term: weighted scalar}`` (so the distiller can log each sub-term)."""
    return paddle.add_n(list(value.values())) if isinstance(value, dict) else value


class FeatureLoss(nn.Layer):
    """Base class of a loss between one student and one teacher feature map.

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
