"""Masked Generative Distillation (MGD).

Yang, Li, Yuan, Zhang, Huang, "Masked Generative Distillation", ECCV 2022 (arXiv:2205.01529).
Reference code: ``yzd-v/MGD mmdet/distillation/losses/mgd.py`` (detection, spatial mask) and
``yzd-v/MGD cls/...`` (classification, channel mask).
"""
from typing import Optional, Sequence

import paddle
import paddle.nn as nn
from ppdet.core.workspace import register

from .base import FeatureLoss, torch_default_conv2d

__all__ = ['MGDLoss']

_MASK_MODES = ('spatial', 'channel')


@register
class MGDLoss(FeatureLoss):
    """Masked Generative Distillation loss (Yang et al., ECCV 2022).

    The (aligned) student feature is randomly masked, a small generator (3x3 conv, ReLU, 3x3 conv)
    reconstructs the teacher feature from it, and the loss is
    ``alpha_mgd * sum((generator(align(S) * mask) - T) ** 2) / N``.

    Args:
        student_channels (int): student channels ``Cs``.
        teacher_channels (int): teacher channels ``Ct``; a 1x1 align conv is added when they differ.
        alpha_mgd (float): loss weight. Default 2e-5 (the reference's detection setting).
        lambda_mgd (float): probability of masking each position (spatial) or channel (channel mode),
            ``0 <= lambda_mgd < 1``; 0 disables masking. Default 0.65.
        mask_mode (str): ``'spatial'`` (mask ``[N, 1, H, W]``, detection) or ``'channel'``
            (mask ``[N, C, 1, 1]``, the reference's classification variant).
    """

    def __init__(self,
                 student_channels: int,
                 teacher_channels: int,
                 alpha_mgd: float = 2e-5,
                 lambda_mgd: float = 0.65,
                 mask_mode: str = 'spatial'):
        super().__init__(student_channels, teacher_channels)
        alpha_mgd, lambda_mgd = float(alpha_mgd), float(lambda_mgd)
        if not 0.0 <= lambda_mgd < 1.0:
            raise ValueError(f'lambda_mgd must satisfy 0 <= lambda_mgd < 1, got {lambda_mgd}')
        if mask_mode not in _MASK_MODES:
            raise ValueError(f'mask_mode must be one of {_MASK_MODES}, got {mask_mode!r}')
        self.alpha_mgd = alpha_mgd
        self.lambda_mgd = lambda_mgd
        self.mask_mode = mask_mode
        c = self.teacher_channels
        # PyTorch's default init, as the reference's nn.Conv2d generator
        self.generation = nn.Sequential(
            torch_default_conv2d(c, c, kernel_size=3, padding=1),
            nn.ReLU(),
            torch_default_conv2d(c, c, kernel_size=3, padding=1))

    def sample_mask(self, shape: Sequence[int]) -> paddle.Tensor:
        """Draw a random keep-mask for a feature of shape ``[N, C, H, W]``.

        Returns float32 ``[N, 1, H, W]`` (spatial mode) or ``[N, C, 1, 1]`` (channel mode): 0 (masked)
        where ``uniform[0, 1) > 1 - lambda_mgd``, i.e. with probability ``lambda_mgd``, else 1.
        """
        n, c, h, w = [int(v) for v in shape]
        mask_shape = [n, 1, h, w] if self.mask_mode == 'spatial' else [n, c, 1, 1]
        rand = paddle.rand(mask_shape, dtype='float32')
        mask = paddle.cast(rand <= 1.0 - self.lambda_mgd, 'float32')
        mask.stop_gradient = True
        return mask

    def masked_loss(self, student: paddle.Tensor, teacher: paddle.Tensor,
                    mask: paddle.Tensor) -> paddle.Tensor:
        """Weighted MGD loss for a given keep-mask.

        Args:
            student: ``[N, Cs, H, W]`` raw student feature (aligned here).
            teacher: ``[N, Ct, H, W]`` teacher feature.
            mask: keep-mask broadcastable to ``[N, Ct, H, W]`` (see :meth:`sample_mask`).

        Returns:
            scalar ``alpha_mgd * sum((generation(align(student) * mask) - teacher) ** 2) / N``.
        """
        self.check_shapes(student, teacher)
        num = int(teacher.shape[0])
        masked = self.align_student(student) * paddle.cast(mask, student.dtype)
        generated = self.generation(masked)
        dis_loss = paddle.sum(paddle.square(generated - teacher.detach())) / num
        return self.alpha_mgd * dis_loss

    def forward(self,
                student_feat: paddle.Tensor,
                teacher_feat: paddle.Tensor,
                inputs: Optional[dict] = None) -> paddle.Tensor:
        """MGD loss with a freshly sampled mask.

        Args:
            student_feat: ``[N, Cs, H, W]``.
            teacher_feat: ``[N, Ct, H, W]`` (constant).
            inputs: unused (MGD does not use ground truth).

        Returns:
            scalar Tensor.
        """
        return self.masked_loss(student_feat, teacher_feat, self.sample_mask(teacher_feat.shape))
