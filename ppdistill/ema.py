"""EMA of the student alone, and the EMA state that makes ``--resume`` exact.

ppdet's ``ModelEMA`` walks ``model.state_dict()``; over a distiller that is the frozen teacher too (an
extra fp32 copy of it and per-step work for nothing). :class:`StudentEMA` averages the student only and
hands ppdet's Trainer a full distiller state dict at snapshot time (teacher and distill modules as they
are), so the Trainer's ``model.set_dict(ema.apply())`` / ``model.set_dict(raw)`` swap works unchanged.

:func:`ema_state` / :func:`restore_ema` save and restore the running average itself (the bias-uncorrected
accumulator, its step, last decay and epoch): ppdet's own resume seeds the accumulator with the
bias-corrected weights and so drifts from an uninterrupted run.
"""
from typing import Dict, Optional

import paddle
import paddle.nn as nn
from ppdet.optimizer import ModelEMA

from .errors import PPDistillError

__all__ = ['StudentEMA', 'ema_from_config', 'ema_state', 'restore_ema']

STUDENT_PREFIX = 'student_model.'


class StudentEMA(ModelEMA):
    """``ModelEMA`` over ``distiller.student_model``; ``apply()`` returns the whole distiller's state.

    ``ema_black_list`` names are the student's own (as for a plain ppdet model).
    """

    def __init__(self, distiller: nn.Layer, **kwargs):
        super().__init__(distiller.student_model, **kwargs)
        self._distiller = distiller

    def apply(self) -> Dict[str, paddle.Tensor]:
        averaged = super().apply()
        full = self._distiller.state_dict()  # live tensors: teacher and distill modules stay as they are
        full.update({STUDENT_PREFIX + k: v for k, v in averaged.items()})
        return full


def ema_from_config(model: nn.Layer, cfg) -> ModelEMA:
    """The trainer's EMA with ppdet's config keys and defaults; student-only for a distiller."""
    kwargs = dict(decay=cfg.get('ema_decay', 0.9998), ema_decay_type=cfg.get('ema_decay_type', 'threshold'),
                  cycle_epoch=cfg.get('cycle_epoch', -1), ema_black_list=cfg.get('ema_black_list', None),
                  ema_filter_no_grad=cfg.get('ema_filter_no_grad', False))
    return StudentEMA(model, **kwargs) if hasattr(model, 'student_model') else ModelEMA(model, **kwargs)


def ema_state(ema: ModelEMA) -> dict:
    """What :func:`restore_ema` needs to continue the average exactly (black-listed entries are the live
    model tensors and are not part of it)."""
    return {'state': {k: v for k, v in ema.state_dict.items() if k not in ema.ema_black_list},
            'step': ema.step, 'epoch': ema.epoch, 'decay': getattr(ema, '_decay', None)}


def restore_ema(ema: ModelEMA, saved: Optional[dict], source: str) -> None:
    """Put :func:`ema_state`'s output back; with ``saved=None`` the average restarts (step 0)."""
    if saved is None:
        ema.reset()
        return
    own = {k for k in ema.state_dict if k not in ema.ema_black_list}
    missing = sorted(own - set(saved['state']))
    if missing:
        raise PPDistillError(f'{source}: the saved EMA lacks {len(missing)} of {len(own)} tensors (e.g. '
                             f'{missing[0]}); it was written for another model or ema_black_list')
    for key in own:
        ema.state_dict[key] = saved['state'][key].astype(ema.state_dict[key].dtype)  # as ModelEMA.resume
    ema.step, ema.epoch = int(saved['step']), int(saved['epoch'])
    if saved.get('decay') is not None:
        ema._decay = float(saved['decay'])
