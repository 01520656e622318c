"""Checkpoints (DESIGN principle 5): a plain ppdet student checkpoint, with distill state beside it.

``<name>.pdparams`` holds the student alone, so ``create(student_architecture)`` loads it with no prefix
stripping and stock eval/infer/export work. ``<name>.pdopt`` is ppdet's optimizer state (it includes the
distill modules' slots) with ``last_epoch``; ``<name>.pddistill`` holds the distill modules (align convs,
generators) so ``--resume`` continues exactly; ``<name>.pdema`` the raw student when EMA is on.
Every file is written to a temporary name and renamed, so an interrupted save never leaves a torn file.
"""
import os
from typing import Dict, Optional

import paddle
import paddle.nn as nn
from ppdet.utils.checkpoint import load_weight
from ppdet.utils.logger import setup_logger

from .errors import PPDistillError

logger = setup_logger(__name__)

__all__ = ['atomic_save', 'save_checkpoint', 'resume_checkpoint', 'strip_suffix']

DISTILL_SUFFIX = '.pddistill'
# Optimizer slots are keyed by paddle's unique parameter names, which depend on build order (another
# teacher config, another process layout); the structured names saved beside them let resume remap them.
PARAM_NAMES_KEY = 'ppdistill_param_names'


def strip_suffix(path: str) -> str:
    for suffix in ('.pdparams', '.pdopt', '.pdema', DISTILL_SUFFIX):
        if path.endswith(suffix):
            return path[:-len(suffix)]
    return path


def atomic_save(obj, path: str) -> None:
    """``paddle.save`` to ``path`` via a temporary file and an atomic rename."""
    tmp = f'{path}.tmp{os.getpid()}'
    paddle.save(obj, tmp)
    os.replace(tmp, path)


def _sub_state(state: Dict[str, paddle.Tensor], prefix: str) -> Dict[str, paddle.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def save_checkpoint(model: nn.Layer, optimizer, save_dir: str, save_name: str, last_epoch: int,
                    raw_state: Optional[dict] = None) -> str:
    """Write ``save_dir/save_name.*``; ``raw_state`` is the model's pre-EMA state when EMA is applied."""
    os.makedirs(save_dir, exist_ok=True)
    base = os.path.join(save_dir, save_name)
    student = getattr(model, 'student_model', model)
    opt_state = optimizer.state_dict()
    opt_state['last_epoch'] = last_epoch
    opt_state[PARAM_NAMES_KEY] = {n: p.name for n, p in model.named_parameters()}
    atomic_save(opt_state, base + '.pdopt')
    if hasattr(model, 'distill_state_dict'):
        distill = (_sub_state(raw_state, 'distill_losses.') if raw_state is not None
                   else model.distill_state_dict())
        atomic_save(distill, base + DISTILL_SUFFIX)
    if raw_state is not None:
        raw_student = _sub_state(raw_state, 'student_model.') if student is not model else raw_state
        atomic_save(raw_student, base + '.pdema')
    atomic_save(student.state_dict(), base + '.pdparams')  # last: its presence marks a whole checkpoint
    logger.info(f'Save checkpoint: {base}.pdparams')
    return base


def _renamed(key: str, rename: Dict[str, str]) -> str:
    old = max((o for o in rename if key.startswith(o + '_')), key=len, default=None)
    return key if old is None else rename[old] + key[len(old):]


def load_optimizer_state(optimizer, model: nn.Layer, path: str) -> int:
    """Restore optimizer slots saved by :func:`save_checkpoint` (remapped by structured parameter
    name when paddle's unique names differ); return the saved epoch (0 when there is no ``.pdopt``)."""
    file = strip_suffix(path) + '.pdopt'
    if not os.path.isfile(file):
        logger.warning(f'{file} not found: optimizer state restarts')
        return 0
    state = paddle.load(file)
    last_epoch = int(state.pop('last_epoch', 0))
    saved_names = state.pop(PARAM_NAMES_KEY, None) or {}
    current = {n: p.name for n, p in model.named_parameters()}
    rename = {old: current[n] for n, old in saved_names.items() if n in current and current[n] != old}
    if rename:
        state = {_renamed(k, rename): v for k, v in state.items()}
    for key, value in optimizer.state_dict().items():
        state.setdefault(key, value)
    optimizer.set_state_dict(state)
    return last_epoch


def resume_checkpoint(model: nn.Layer, optimizer, path: str, ema=None) -> int:
    """Restore student (or plain model), optimizer and distill state from ``path``; return its epoch."""
    student = getattr(model, 'student_model', None)
    if student is None:
        load_weight(model, path, None, ema)
        return load_optimizer_state(optimizer, model, path)
    if ema is not None:
        logger.warning('EMA with distillation: the EMA average restarts from the resumed weights')
    load_weight(student, path)
    distill_file = strip_suffix(path) + DISTILL_SUFFIX
    if os.path.isfile(distill_file):
        state = paddle.load(distill_file)
        own = model.distill_state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise PPDistillError(f'{distill_file} lacks {len(missing)} distill tensors (e.g. {missing[0]}); '
                                 'it was written for a different distill config')
        model.distill_losses.set_state_dict(state)
        logger.info(f'Resumed distill modules from {distill_file}')
    else:
        logger.warning(f'{distill_file} not found: distill modules restart from their initial values')
    return load_optimizer_state(optimizer, model, path)
