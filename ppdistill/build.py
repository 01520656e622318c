"""Distill config → distiller (DESIGN principle 4).

A distill config names the method (``slim:``, a registered :class:`~ppdistill.distiller.Distiller`), the
teacher's model config and the teacher's weights::

    slim: MGDDistillModel
    teacher_config: ../../demo/picodet_teacher.yml   # relative to this file, else to the CWD
    teacher_weights: output/picodet_teacher/model_final.pdparams
    MGDDistillModel: {alpha_mgd: 2.0e-5, lambda_mgd: 0.65}

Only these distill keys enter ppdet's global config; the teacher YAML is loaded inside
:func:`~ppdistill.config_scope.config_scope`, so the student's reader, LR, epochs and ``-o`` overrides
survive. Teacher weights are mandatory (``allow_random_teacher: true`` waives them); a missing file or a
checkpoint that matches too few teacher tensors is an error naming the file and the counts.
ppdet's own format (``slim: Distill`` + ``slim_method: FGD`` with the teacher model config inline and
``pretrain_weights`` as teacher weights) is translated to the same thing.
"""
import inspect
import os
from typing import Optional, Tuple

import paddle
import paddle.nn as nn
import yaml
from ppdet.core.workspace import create, global_config, load_config, merge_config
from ppdet.core.config.schema import SchemaDict
from ppdet.utils.logger import setup_logger

from .checkpoint import load_state_file
from .config_scope import config_scope, create_fresh
from .distiller import DistillConfigError, Distiller

logger = setup_logger(__name__)

__all__ = ['load_distill_config', 'build_distiller', 'build_teacher', 'load_checked_weights',
           'is_distill_config']

DISTILL_KEYS = ('slim', 'teacher_config', 'teacher_weights', 'allow_random_teacher', 'teacher_min_match')
_UPSTREAM_FGD_ARGS = ('temp', 'alpha_fgd', 'beta_fgd', 'gamma_fgd', 'lambda_fgd')


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise DistillConfigError(f'distill config not found: {path}')
    with open(path) as f:
        raw = yaml.load(f, Loader=yaml.Loader)
    if not isinstance(raw, dict):
        raise DistillConfigError(f'distill config {path} is not a YAML mapping')
    return raw


def _distiller_class(name) -> Optional[type]:
    entry = global_config.get(name) if isinstance(name, str) else None
    if isinstance(entry, SchemaDict):
        cls = getattr(entry.pymodule, name, None)
        if isinstance(cls, type) and issubclass(cls, Distiller):
            return cls
    return None


def is_distill_config(path: str) -> bool:
    """True for a ppdistill distill config or ppdet's ``slim: Distill`` format."""
    slim = _read_yaml(path).get('slim')
    return slim == 'Distill' or _distiller_class(slim) is not None


def _translate_upstream(raw: dict, path: str) -> dict:
    """ppdet's ``slim: Distill`` file: the file itself is the teacher config."""
    method = raw.get('slim_method')
    if method != 'FGD':
        raise DistillConfigError(
            f"{path}: ppdet distill format with slim_method={method!r} is not translated by ppdistill "
            "(only FGD is); write a ppdistill distill config (see configs/slim/distill/)")
    fgd = raw.get(raw.get('distill_loss') or 'FGDFeatureLoss') or {}
    return {'slim': 'FocalGlobalDistillModel', 'teacher_config': os.path.abspath(path),
            'teacher_weights': raw.get('pretrain_weights'),
            'FocalGlobalDistillModel': {k: fgd[k] for k in _UPSTREAM_FGD_ARGS if k in fgd}}


def _resolve_config_path(value: str, base_dir: str) -> str:
    for candidate in (os.path.join(base_dir, value), value):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise DistillConfigError(f"teacher_config '{value}' not found (looked relative to {base_dir} and the "
                             'current directory)')


def load_distill_config(path: str) -> dict:
    """Validate a distill config and merge only its distill keys into ppdet's global config.

    Sets ``filename`` to the distill config's name, so outputs go to ``<save_dir>/<distill name>/``.
    """
    raw = _read_yaml(path)
    if raw.get('slim') == 'Distill':
        raw = _translate_upstream(raw, path)
    slim = raw.get('slim')
    if _distiller_class(slim) is None:
        known = sorted(k for k, v in global_config.items() if _distiller_class(k) is not None)
        raise DistillConfigError(f"{path}: slim: {slim!r} is not a ppdistill distiller; use one of {known}")
    if not raw.get('teacher_config'):
        raise DistillConfigError(f'{path}: teacher_config is missing (the teacher model YAML)')
    if not raw.get('allow_random_teacher') and not raw.get('teacher_weights'):
        raise DistillConfigError(f'{path}: teacher_weights is missing; set it to the trained teacher '
                                 'checkpoint (or allow_random_teacher: true to distill from a random teacher)')
    allowed = set(DISTILL_KEYS) | {slim, 'losses'} | {k for k, v in raw.items()
                                                      if isinstance(global_config.get(k), SchemaDict)}
    stray = sorted(set(raw) - allowed)
    if stray:
        raise DistillConfigError(f'{path}: keys {stray} do not belong in a distill config (model and '
                                 'training settings come from the student config; the teacher config '
                                 'goes in teacher_config)')
    raw['teacher_config'] = _resolve_config_path(raw['teacher_config'], os.path.dirname(os.path.abspath(path)))
    if 'losses' in raw:  # generic form: `losses:` at top level belongs to the distiller's section
        raw.setdefault(slim, {})['losses'] = raw.pop('losses')
    merge_config(raw)
    global_config['filename'] = os.path.splitext(os.path.basename(path))[0]
    return raw


def _weights_file(path: str) -> str:
    if path.startswith(('http://', 'https://')):
        from ppdet.utils.download import get_weights_path
        path = get_weights_path(path)
    candidates = [path] if path.endswith('.pdparams') else [path + '.pdparams', path]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise DistillConfigError(f"weights file not found: {candidates[0]}")


def load_checked_weights(model: nn.Layer, path: str, min_match: float = 0.95,
                         role: str = 'teacher') -> Tuple[int, int]:
    """Load ``path`` into ``model``; fail unless ≥ ``min_match`` of its tensors match by name and shape."""
    file = _weights_file(path)
    state = load_state_file(file, f'{role} weights')
    own = model.state_dict()
    matched = {k: v for k, v in state.items()
               if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if len(matched) < min_match * len(own):
        raise DistillConfigError(
            f'{role} weights {file} match only {len(matched)}/{len(own)} {role} tensors by name and shape '
            f'(need {min_match:.0%}); is it a checkpoint of the {role} config?')
    model.set_state_dict(matched)
    logger.info(f'Loaded {role} weights {file}: {len(matched)}/{len(own)} tensors matched')
    return len(matched), len(own)


def build_teacher(config_path: str, weights: Optional[str], allow_random: bool = False,
                  min_match: float = 0.95) -> Tuple[nn.Layer, str]:
    """Build the teacher from its own YAML without touching the global config; load checked weights."""
    if not weights and not allow_random:
        raise DistillConfigError('teacher_weights is not set (allow_random_teacher: true waives it)')
    if weights:
        _weights_file(weights)  # fail before building anything
    with config_scope():
        teacher_cfg = load_config(config_path)
        arch = teacher_cfg.architecture
        teacher = create_fresh(arch)
    if weights:
        load_checked_weights(teacher, weights, min_match, 'teacher')
    else:
        logger.warning('allow_random_teacher: distilling from a RANDOMLY INITIALISED teacher')
    teacher.eval()
    return teacher, arch


def build_distiller(cfg: dict) -> Distiller:
    """Student (from the global config) + teacher (isolated) + the configured distiller."""
    cls = _distiller_class(cfg['slim'])
    params = set(inspect.signature(cls).parameters)
    unknown = sorted(set(dict.keys(global_config[cfg['slim']])) - params)
    if unknown:
        raise DistillConfigError(f"{cfg['slim']}: unknown option(s) {unknown}; it accepts "
                                 f"{sorted(params - {'student_model', 'teacher_model', 'student_arch', 'teacher_arch'})}")
    weights = cfg.get('teacher_weights')
    if weights:
        _weights_file(weights)  # fail before building anything
    # Student first: with the same seed it starts from the same init as a plain ppdet run.
    student = create_fresh(cfg['architecture'])
    if cfg.get('pretrain_weights'):
        from ppdet.utils.checkpoint import load_pretrain_weight
        load_pretrain_weight(student, cfg['pretrain_weights'])
    teacher, teacher_arch = build_teacher(cfg['teacher_config'], weights,
                                          bool(cfg.get('allow_random_teacher', False)),
                                          float(cfg.get('teacher_min_match', 0.95)))
    return create(cfg['slim'], student_model=student, teacher_model=teacher,
                  student_arch=cfg['architecture'], teacher_arch=teacher_arch)
