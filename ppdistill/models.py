"""Registered single-method presets over :class:`~ppdistill.distiller.Distiller`.

They are the names users write as ``slim:`` in a distill config. Each only turns a few method
arguments into the ``losses`` list of the one distiller; none adds behaviour of its own. ``weight`` is the
one entry's weight (a number, or ``auto``: measured before training, with ``auto_weight`` as for
:class:`~ppdistill.distiller.Distiller`).
"""
from typing import Optional, Sequence, Union

from ppdet.core.workspace import register

from .distiller import Distiller

__all__ = ['MGDDistillModel', 'FocalGlobalDistillModel', 'FGFIDistillModel']


@register
class MGDDistillModel(Distiller):
    """Masked Generative Distillation (Yang et al., ECCV 2022) on every stride-paired ``feature`` level."""

    def __init__(self, student_model=None, teacher_model=None, student_arch: str = None,
                 teacher_arch: str = None, feature: str = 'fpn', levels: Optional[Sequence[int]] = None,
                 alpha_mgd: float = 2e-5, lambda_mgd: float = 0.65, mask_mode: str = 'spatial',
                 probe_size: int = 320, init_student: bool = False, nonfinite: str = 'error',
                 distill_lr_mult: float = 1.0, weight: Union[float, str] = 1.0, auto_weight: Optional[dict] = None):
        losses = [{'type': 'MGDLoss', 'student': feature, 'teacher': feature, 'levels': levels,
                   'name': 'mgd', 'weight': weight, 'args': {'alpha_mgd': alpha_mgd, 'lambda_mgd': lambda_mgd,
                                           'mask_mode': mask_mode}}]
        super().__init__(student_model, teacher_model, student_arch, teacher_arch, losses, probe_size,
                         init_student, nonfinite, distill_lr_mult, auto_weight)


@register
class FocalGlobalDistillModel(Distiller):
    """Focal and Global Distillation (Yang et al., CVPR 2022) on every stride-paired ``feature`` level.

    (ppdet registers its own ``FGDDistillModel``; this name avoids the collision.)
    """

    def __init__(self, student_model=None, teacher_model=None, student_arch: str = None,
                 teacher_arch: str = None, feature: str = 'fpn', levels: Optional[Sequence[int]] = None,
                 temp: float = 0.5, alpha_fgd: float = 1e-3, beta_fgd: float = 5e-4,
                 gamma_fgd: float = 1e-3, lambda_fgd: float = 5e-6, probe_size: int = 320,
                 init_student: bool = False, nonfinite: str = 'error', distill_lr_mult: float = 1.0,
                 weight: Union[float, str] = 1.0, auto_weight: Optional[dict] = None):
        losses = [{'type': 'FGDLoss', 'student': feature, 'teacher': feature, 'levels': levels,
                   'name': 'fgd', 'weight': weight, 'args': {'temp': temp, 'alpha_fgd': alpha_fgd, 'beta_fgd': beta_fgd,
                                           'gamma_fgd': gamma_fgd, 'lambda_fgd': lambda_fgd}}]
        super().__init__(student_model, teacher_model, student_arch, teacher_arch, losses, probe_size,
                         init_student, nonfinite, distill_lr_mult, auto_weight)


@register
class FGFIDistillModel(Distiller):
    """Fine-grained feature imitation (Wang et al., CVPR 2019) on every stride-paired ``feature`` level.

    ``anchors`` describes the student's anchors (see :class:`ppdistill.losses.fgfi.LevelAnchors`: RetinaNet
    style, explicit per-level ``wh`` or ``virtual_anchor_scale``); default ppdet's RetinaNet anchors.
    """

    def __init__(self, student_model=None, teacher_model=None, student_arch: str = None,
                 teacher_arch: str = None, feature: str = 'fpn', levels: Optional[Sequence[int]] = None,
                 psi: float = 0.5, anchors: Optional[dict] = None, loss_weight: float = 0.01,
                 adapt_relu: bool = True, probe_size: int = 320, init_student: bool = False,
                 nonfinite: str = 'error', distill_lr_mult: float = 1.0, weight: Union[float, str] = 1.0,
                 auto_weight: Optional[dict] = None):
        losses = [{'type': 'FGFILoss', 'student': feature, 'teacher': feature, 'levels': levels,
                   'name': 'fgfi', 'weight': weight, 'args': {'psi': psi, 'anchors': anchors, 'loss_weight': loss_weight,
                                            'adapt_relu': adapt_relu}}]
        super().__init__(student_model, teacher_model, student_arch, teacher_arch, losses, probe_size,
                         init_student, nonfinite, distill_lr_mult, auto_weight)
