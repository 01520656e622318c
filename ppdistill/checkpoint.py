"""Checkpoints (docs/design.md, principle 5): a plain ppdet student checkpoint, with distill state beside it.

``<name>.pdparams`` holds the student alone (the EMA average when EMA is on, as in ppdet), so
``create(student_architecture)`` loads it with no prefix stripping and stock eval/infer/export work.
``<name>.pdema`` holds the raw (trained) student when EMA is on, ppdet's convention. ``<name>.pdopt`` is
ppdet's optimizer state (it includes the distill modules' slots) with ``last_epoch`` and, with EMA, the
running average itself; ``<name>.pddistill`` holds the distill modules (align convs, generators) and the
measured weights of ``weight: auto`` entries (``auto_weights.factors``), so ``-r`` does not measure again.
Resume puts the raw trajectory back into the model and the average into the EMA, so an interrupted run
continues exactly. Files are written to temporary names and renamed (``.pdparams`` last), so a kill
mid-save never leaves a torn file; every file a user hands us is read through :func:`load_state_file`.
"""
import os
from typing import Dict, Optional

import paddle
import paddle.nn as nn
from ppdet.utils.logger import setup_logger

from .ema import ema_state, restore_ema
from .errors import PPDistillError

logger = setup_logger(__name__)

__all__ = ['atomic_save', 'load_state_file', 'save_checkpoint', 'resume_checkpoint', 'strip_suffix']

DISTILL_SUFFIX = '.pddistill'
# Optimizer slots are keyed by paddle's unique parameter names, which depend on build order (another
# teacher config, another process layout); the structured names saved beside them let resume remap them.
PARAM_NAMES_KEY = 'ppdistill_param_names'
EMA_KEY = 'ppdistill_ema'


def strip_suffix(path: str) -> str:
    for suffix in ('.pdparams', '.pdopt', '.pdema', DISTILL_SUFFIX):
        if path.endswith(suffix):
            return path[:-len(suffix)]
    return path


def load_state_file(path: str, what: str = 'state file') -> dict:
    """``paddle.load(path)`` of a state dict; a missing, corrupt or truncated file is a one-line
    :class:`PPDistillError` naming it (``what`` says which file it is, e.g. ``'teacher weights'``)."""
    if not os.path.isfile(path):
        raise PPDistillError(f'{what} {path} not found')
    try:
        state = paddle.load(path)
    except Exception as err:  # paddle raises ValueError/EOFError/UnpicklingError... for a bad file
        raise PPDistillError(f'{what} {path} cannot be read (corrupt or truncated? {type(err).__name__}: '
                             f'{str(err).splitlines()[0] if str(err) else "no detail"}); '
                             're-create or re-download it') from None
    if not isinstance(state, dict):
        raise PPDistillError(f'{what} {path} holds a {type(state).__name__}, not a state dict')
    return state


def atomic_save(obj, path: str) -> None:
    """``paddle.save`` to ``path`` via a synced temporary file and an atomic rename."""
    tmp = _save_tmp(obj, path)
    os.replace(tmp, path)


def _save_tmp(obj, path: str) -> str:
    tmp = f'{path}.tmp{os.getpid()}'
    paddle.save(obj, tmp)
    with open(tmp, 'rb+') as f:  # on disk before the rename makes it visible (survives power loss)
        os.fsync(f.fileno())
    return tmp


def _sub_state(state: Dict[str, paddle.Tensor], prefix: str) -> Dict[str, paddle.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def save_checkpoint(model: nn.Layer, optimizer, save_dir: str, save_name: str, last_epoch: int,
                    raw_state: Optional[dict] = None, ema=None) -> str:
    """Write ``save_dir/save_name.*``. With EMA applied to ``model``, ``raw_state`` is the model's
    pre-EMA state dict and ``ema`` the trainer's EMA (its running average goes into ``.pdopt``)."""
    os.makedirs(save_dir, exist_ok=True)
    base = os.path.join(save_dir, save_name)
    student = getattr(model, 'student_model', model)
    opt_state = optimizer.state_dict()
    opt_state['last_epoch'] = last_epoch
    opt_state[PARAM_NAMES_KEY] = {n: p.name for n, p in model.named_parameters()}
    if ema is not None:
        opt_state[EMA_KEY] = ema_state(ema)
    files = {'.pdopt': opt_state}
    if hasattr(model, 'distill_state_dict'):
        files[DISTILL_SUFFIX] = model.distill_state_dict(raw_state)
    if raw_state is not None:
        files['.pdema'] = _sub_state(raw_state, 'student_model.') if student is not model else raw_state
    files['.pdparams'] = student.state_dict()  # renamed last: its presence marks a whole checkpoint
    # all written first, then renamed: a kill leaves either the old or the new set (bar the renames)
    written = [(_save_tmp(obj, base + suffix), base + suffix) for suffix, obj in files.items()]
    for tmp, final in written:
        os.replace(tmp, final)
    if raw_state is None and os.path.isfile(base + '.pdema'):
        os.remove(base + '.pdema')  # an older EMA run's raw weights; resume would prefer them
    logger.info(f'Save checkpoint: {base}.pdparams')
    return base


def _renamed(key: str, rename: Dict[str, str]) -> str:
    old = max((o for o in rename if key.startswith(o + '_')), key=len, default=None)
    return key if old is None else rename[old] + key[len(old):]


def _set_optimizer_state(optimizer, model: nn.Layer, state: dict) -> None:
    """Optimizer slots saved by :func:`save_checkpoint`, remapped by structured parameter name when
    paddle's unique names differ."""
    saved_names = state.pop(PARAM_NAMES_KEY, None) or {}
    current = {n: p.name for n, p in model.named_parameters()}
    rename = {old: current[n] for n, old in saved_names.items() if n in current and current[n] != old}
    if rename:
        state = {_renamed(k, rename): v for k, v in state.items()}
    for key, value in optimizer.state_dict().items():
        state.setdefault(key, value)
    optimizer.set_state_dict(state)


def _load_exact(layer: nn.Layer, file: str, what: str, state: Optional[dict] = None) -> None:
    """Every tensor of ``layer`` from ``file`` (same names and shapes), cast to the layer's dtypes; ``state``:
    the file's contents (or the part of them that is ``layer``'s) when already read."""
    state = load_state_file(file, what) if state is None else state
    own = layer.state_dict()
    bad = sorted(k for k, v in own.items() if k not in state or tuple(state[k].shape) != tuple(v.shape))
    if bad:
        raise PPDistillError(f'{what} {file} lacks or mis-shapes {len(bad)} of {len(own)} tensors (e.g. '
                             f'{bad[0]}); it was written for a different model or distill config')
    layer.set_state_dict({k: _as_tensor(state[k]).astype(v.dtype) for k, v in own.items()})


def _as_tensor(value) -> paddle.Tensor:
    return value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)


def _resume_auto_weights(auto: Optional[nn.Layer], file: str, state: dict) -> None:
    """The measured ``weight: auto`` weights from a ``.pddistill`` file's ``state``. A run with auto entries
    needs them (measuring mid-training would measure another student); a file that has them for a config
    without auto entries is named in a warning (the config's fixed weights apply from here on)."""
    saved = _sub_state(state, 'auto_weights.')
    if auto is None:
        if saved:
            logger.warning(f'{file} holds weights measured for weight: auto entries, but the distill config has none: '
                           'its own weights apply from here on')
        return
    if not saved:
        raise PPDistillError(f'resume distill state {file} holds no measured weights for the weight: auto entries '
                             f'{auto.entries} (it was written by a run without weight: auto); resume with that '
                             "run's distill config")
    _load_exact(auto, file, 'resume distill state (weight: auto)', saved)


def resume_checkpoint(model: nn.Layer, optimizer, path: str, ema=None) -> int:
    """Continue the run saved at ``path``: raw student (``.pdema`` if EMA was on, else ``.pdparams``),
    distill modules, optimizer slots and the EMA average; return the saved epoch."""
    base = strip_suffix(path)
    student = getattr(model, 'student_model', model)
    raw_file = base + ('.pdema' if os.path.isfile(base + '.pdema') else '.pdparams')
    _load_exact(student, raw_file, 'resume checkpoint')
    logger.info(f'Resumed model weights from {raw_file}')
    if hasattr(model, 'distill_state_dict'):
        distill_file = base + DISTILL_SUFFIX
        if os.path.isfile(distill_file):
            state = load_state_file(distill_file, 'resume distill state')
            _load_exact(model.distill_losses, distill_file, 'resume distill state', state)
            _resume_auto_weights(getattr(model, 'auto_weights', None), distill_file, state)
            logger.info(f'Resumed distill modules from {distill_file}')
        else:
            logger.warning(f'{distill_file} not found: distill modules restart from their initial values')
    opt_file, last_epoch, saved_ema = base + '.pdopt', 0, None
    if os.path.isfile(opt_file):
        state = load_state_file(opt_file, 'resume optimizer state')
        last_epoch, saved_ema = int(state.pop('last_epoch', 0)), state.pop(EMA_KEY, None)
        _set_optimizer_state(optimizer, model, state)
    else:
        logger.warning(f'{opt_file} not found: optimizer state restarts')
    if ema is not None:
        if saved_ema is None:
            logger.warning(f'{opt_file} holds no EMA average: the EMA restarts from the resumed weights')
        restore_ema(ema, saved_ema, opt_file)
    return last_epoch
