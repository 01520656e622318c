"""Focal and Global Knowledge Distillation (FGD).

Yang, Li, Jiang, Zhang, Huang, Yuan, "Focal and Global Knowledge Distillation for Detectors",
CVPR 2022 (arXiv:2111.11837). Reference code: ``yzd-v/FGD mmdet/distillation/losses/fgd.py``.
"""
import math
from typing import Optional, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from ppdet.core.workspace import register

from .base import FeatureLoss, torch_default_conv2d
from ..masks import fgd_masks

__all__ = ['FGDLoss']


def _channel_add_block(channels: int) -> nn.Sequential:
    """GcBlock-style transform: 1x1 conv (C -> C/2), LayerNorm([C/2, 1, 1]), ReLU, 1x1 conv (C/2 -> C).

    Init as the reference: the first conv has PyTorch's default init, the LayerNorm ones/zeros, and only
    the last conv is zero-initialised (the reference's ``last_zero_init``), so the relation term
    starts as a plain MSE while the first conv, the LayerNorm and ``conv_mask`` still get gradients once
    the last conv has moved.
    """
    zero = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0))
    return nn.Sequential(
        torch_default_conv2d(channels, channels // 2, kernel_size=1),
        nn.LayerNorm([channels // 2, 1, 1]),
        nn.ReLU(),
        nn.Conv2D(channels // 2, channels, kernel_size=1, weight_attr=zero, bias_attr=zero))


def _conv_mask(channels: int) -> nn.Conv2D:
    """1x1 conv (C -> 1) giving the global-context attention logits; kaiming-normal, fan_in, ReLU gain,
    as mmcv's ``kaiming_init(mode='fan_in')`` in the reference.

    The reference's conv has a bias, but a constant added to every logit cancels in the softmax over
    positions, so that bias could never receive a gradient; it is left out (the function is identical).
    """
    std = math.sqrt(2.0) / math.sqrt(channels)
    return nn.Conv2D(channels, 1, kernel_size=1,
                     weight_attr=paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, std)),
                     bias_attr=False)


@register
class FGDLoss(FeatureLoss):
    """Focal and Global Knowledge Distillation loss (Yang et al., CVPR 2022).

    ``loss = alpha_fgd * fg + beta_fgd * bg + gamma_fgd * mask + lambda_fgd * rela`` where, with teacher
    spatial/channel attentions ``S_t [N, H, W]``/``C_t [N, C]`` and GT masks from
    :func:`ppdistill.masks.fgd_masks`, ``fg``/``bg`` are the attention-weighted squared errors inside /
    outside the boxes, ``mask`` is the L1 distance between student and teacher attentions and ``rela`` the
    squared error between GcBlock-style global-context outputs. All sums are divided by ``N``.

    Args:
        student_channels (int): student channels ``Cs``.
        teacher_channels (int): teacher channels ``Ct`` (>= 2); a 1x1 align conv is added when they differ.
        temp (float): attention temperature. Default 0.5.
        alpha_fgd (float): foreground weight. Default 1e-3.
        beta_fgd (float): background weight. Default 5e-4.
        gamma_fgd (float): attention (mask) loss weight. Default 1e-3.
        lambda_fgd (float): global relation loss weight. Default 5e-6.
    """

    def __init__(self,
                 student_channels: int,
                 teacher_channels: int,
                 temp: float = 0.5,
                 alpha_fgd: float = 1e-3,
                 beta_fgd: float = 5e-4,
                 gamma_fgd: float = 1e-3,
                 lambda_fgd: float = 5e-6):
        super().__init__(student_channels, teacher_channels)
        if self.teacher_channels < 2:
            raise ValueError(f'FGDLoss needs teacher_channels >= 2, got {self.teacher_channels}')
        self.temp = float(temp)
        if self.temp <= 0:
            raise ValueError(f'temp must be positive, got {temp}')
        self.alpha_fgd = float(alpha_fgd)
        self.beta_fgd = float(beta_fgd)
        self.gamma_fgd = float(gamma_fgd)
        self.lambda_fgd = float(lambda_fgd)
        c = self.teacher_channels
        self.conv_mask_s = _conv_mask(c)
        self.conv_mask_t = _conv_mask(c)
        self.channel_add_conv_s = _channel_add_block(c)
        self.channel_add_conv_t = _channel_add_block(c)

    @staticmethod
    def attention(preds: paddle.Tensor, temp: float) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Spatial and channel attention of a feature ``[N, C, H, W]``.

        Returns ``(S, C_att)``: ``S = H*W*softmax(mean_C|x| / temp)`` over the ``H*W`` positions,
        ``[N, H, W]``; ``C_att = C*softmax(mean_HW|x| / temp)`` over channels, ``[N, C]``.
        """
        n, c, h, w = [int(v) for v in preds.shape]
        value = paddle.abs(preds)
        fea_map = paddle.mean(value, axis=1, keepdim=True)  # [N, 1, H, W]
        spatial = float(h * w) * F.softmax(paddle.reshape(fea_map / temp, [n, h * w]), axis=1)
        spatial = paddle.reshape(spatial, [n, h, w])
        channel_map = paddle.mean(value, axis=[2, 3])  # [N, C]
        channel = float(c) * F.softmax(channel_map / temp, axis=1)
        return spatial, channel

    @staticmethod
    def feature_loss(student: paddle.Tensor, teacher: paddle.Tensor, mask_fg: paddle.Tensor,
                     mask_bg: paddle.Tensor, c_t: paddle.Tensor,
                     s_t: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Foreground/background losses (unweighted).

        ``fea = x * sqrt(S_t) * sqrt(C_t)`` for both student and teacher (teacher attentions);
        ``fg = sum((fea_s - fea_t)^2 * mask_fg) / N`` and likewise ``bg`` with ``mask_bg``.
        Shapes: features ``[N, C, H, W]``, masks and ``s_t`` ``[N, H, W]``, ``c_t`` ``[N, C]``.
        """
        num = int(student.shape[0])
        weight = paddle.sqrt(s_t.unsqueeze(1)) * paddle.sqrt(c_t.unsqueeze(-1).unsqueeze(-1))
        sq_err = paddle.square(student * weight - teacher * weight)  # [N, C, H, W]
        fg_loss = paddle.sum(sq_err * mask_fg.unsqueeze(1)) / num
        bg_loss = paddle.sum(sq_err * mask_bg.unsqueeze(1)) / num
        return fg_loss, bg_loss

    @staticmethod
    def mask_loss(c_s: paddle.Tensor, c_t: paddle.Tensor, s_s: paddle.Tensor,
                  s_t: paddle.Tensor) -> paddle.Tensor:
        """Attention loss ``sum|C_s - C_t| / N + sum|S_s - S_t| / N``."""
        num = int(c_s.shape[0])
        return paddle.sum(paddle.abs(c_s - c_t)) / num + paddle.sum(paddle.abs(s_s - s_t)) / num

    @staticmethod
    def spatial_pool(x: paddle.Tensor, conv_mask: nn.Conv2D) -> paddle.Tensor:
        """Global context ``[N, C, 1, 1]``: positions of ``x [N, C, H, W]`` weighted by
        ``softmax_HW(conv_mask(x))``."""
        n, c, h, w = [int(v) for v in x.shape]
        weights = F.softmax(paddle.reshape(conv_mask(x), [n, 1, h * w]), axis=2)  # [N, 1, HW]
        context = paddle.sum(paddle.reshape(x, [n, c, h * w]) * weights, axis=2)  # [N, C]
        return paddle.reshape(context, [n, c, 1, 1])

    def relation_loss(self, student: paddle.Tensor, teacher: paddle.Tensor) -> paddle.Tensor:
        """Global relation loss ``sum((out_s - out_t)^2) / N`` with
        ``out = x + channel_add(spatial_pool(x))`` (separate student/teacher modules)."""
        num = int(student.shape[0])
        out_s = student + self.channel_add_conv_s(self.spatial_pool(student, self.conv_mask_s))
        out_t = teacher + self.channel_add_conv_t(self.spatial_pool(teacher, self.conv_mask_t))
        return paddle.sum(paddle.square(out_s - out_t)) / num

    def loss_terms(self, student_feat: paddle.Tensor, teacher_feat: paddle.Tensor,
                   mask_fg: paddle.Tensor, mask_bg: paddle.Tensor) -> dict:
        """Unweighted terms ``{'fg', 'bg', 'mask', 'rela'}`` for given masks ``[N, H, W]``.

        ``student_feat`` is the raw ``[N, Cs, H, W]`` student (aligned here), ``teacher_feat``
        ``[N, Ct, H, W]``.
        """
        self.check_shapes(student_feat, teacher_feat)
        student = self.align_student(student_feat)
        teacher = teacher_feat.detach()
        s_t, c_t = self.attention(teacher, self.temp)
        s_s, c_s = self.attention(student, self.temp)
        fg_loss, bg_loss = self.feature_loss(student, teacher, mask_fg, mask_bg, c_t, s_t)
        return {
            'fg': fg_loss,
            'bg': bg_loss,
            'mask': self.mask_loss(c_s, c_t, s_s, s_t),
            'rela': self.relation_loss(student, teacher),
        }

    def forward(self,
                student_feat: paddle.Tensor,
                teacher_feat: paddle.Tensor,
                inputs: Optional[dict] = None) -> paddle.Tensor:
        """FGD loss.

        Args:
            student_feat: ``[N, Cs, H, W]``.
            teacher_feat: ``[N, Ct, H, W]`` (constant).
            inputs: ppdet batch dict with ``'gt_bbox'`` (list of ``[n_i, 4]`` or padded ``[N, M, 4]``, input
                pixels), ``'image'`` (``[N, 3, Hp, Wp]``, the padded batch; its size scales the boxes to
                the grid) and optionally ``'pad_gt_mask'``.

        Returns:
            ``{'fg', 'bg', 'mask', 'rela'}``: the weighted sub-terms (scalars) whose sum
            (:func:`~ppdistill.losses.base.loss_total`) is the loss; the distiller logs each. Images
            without boxes contribute only background, attention and relation terms; every parameter takes
            part in every call.
        """
        if inputs is None or 'gt_bbox' not in inputs or 'image' not in inputs:
            raise ValueError("FGDLoss needs inputs with 'gt_bbox' and 'image'")
        h, w = int(teacher_feat.shape[2]), int(teacher_feat.shape[3])
        mask_fg, mask_bg = fgd_masks(inputs['gt_bbox'], inputs['image'].shape[2:4], h, w,
                                     inputs.get('pad_gt_mask'))
        terms = self.loss_terms(student_feat, teacher_feat, mask_fg, mask_bg)
        return {'fg': self.alpha_fgd * terms['fg'], 'bg': self.beta_fgd * terms['bg'],
                'mask': self.gamma_fgd * terms['mask'], 'rela': self.lambda_fgd * terms['rela']}
