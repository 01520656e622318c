"""CrossKD's crossing: the student's head features after a cut, made to look like the teacher's at the same
cut, to be run through the frozen teacher's remaining head (:meth:`~ppdistill.distiller.Distiller`'s
``cross`` entries; the replacement itself is :meth:`~ppdistill.taps.TapSet.replace`).

Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object Detection", CVPR 2024. Per level and
channel, over (N, H, W), the student feature is standardised and rescaled to the teacher's statistics
at the same cut (``align_scale``, unbiased std)::

    h = (h_s - mean_s) / (std_s + 1e-6) * std_t + mean_t

Where the widths differ a learnable 1x1 conv maps the student's ``Cs`` channels to the teacher's ``Ct``
first (trained by the KD loss alone, saved with the distill state, never part of the student checkpoint).
This adapter is not in the paper, whose student and teacher heads have equal widths.
"""
from typing import Optional

import paddle
import paddle.nn as nn

from .losses.base import torch_default_conv2d

__all__ = ['align_scale', 'CrossAdapter']


def _channel_stats(x: paddle.Tensor, eps: float = 0.0):
    """Per-channel mean and unbiased std over (N, H, W) of ``[N, C, H, W]``, each ``[1, C, 1, 1]``."""
    mean = x.mean(axis=[0, 2, 3], keepdim=True)
    count = max(int(x.shape[0]) * int(x.shape[2]) * int(x.shape[3]) - 1, 1)
    std = (((x - mean) ** 2).sum(axis=[0, 2, 3], keepdim=True) / count).sqrt()
    return mean, std


def align_scale(student: paddle.Tensor, teacher: paddle.Tensor, eps: float = 1e-6) -> paddle.Tensor:
    """``student`` ``[N, C, H, W]`` standardised per channel and rescaled to ``teacher``'s (detached) per-channel
    mean and unbiased std; same shape as ``student`` (the teacher may have another ``H, W``)."""
    s_mean, s_std = _channel_stats(student)
    t_mean, t_std = _channel_stats(teacher.detach())
    return (student - s_mean) / (s_std + eps) * t_std + t_mean


class CrossAdapter(nn.Layer):
    """One level's crossing: optional 1x1 conv ``Cs -> Ct`` (only when they differ), then :func:`align_scale`.

    Args:
        student_channels, teacher_channels: ``Cs``, ``Ct`` at the cut.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.conv: Optional[nn.Conv2D] = None
        if int(student_channels) != int(teacher_channels):
            self.conv = torch_default_conv2d(int(student_channels), int(teacher_channels), kernel_size=1)

    def forward(self, student: paddle.Tensor, teacher: paddle.Tensor) -> paddle.Tensor:
        """``student`` ``[N, Cs, H, W]`` (in the graph), ``teacher`` ``[N, Ct, H, W]`` at the same cut ->
        ``[N, Ct, H, W]`` to stand in for the teacher's own output."""
        x = student if self.conv is None else self.conv(student)
        return align_scale(x, teacher)
