"""Distill config → distiller (docs/design.md, principle 4).

A distill config names the method (``slim:``, a registered :class:`~ppdistill.distiller.Distiller`), the
teacher's model config and the teacher's weights::

    slim: MGDDistillModel
    teacher_config: ../../demo/picodet_teacher.yml   # relative to this file, else to the CWD
    teacher_weights: output/picodet_teacher/model_final.pdparams
    MGDDistillModel: {alpha_mgd: 2.0e-5, lambda_mgd: 0.65}

Only these distill keys enter ppdet's global config. The teacher is built inside
:func:`~ppdistill.config_scope.isolated_scope` from ppdet's registered defaults plus its own YAML chain:
the student's reader, LR, epochs and ``-o`` overrides survive, and none of the student's module options
(a ResNet ``norm_type``, an FPN flag) reaches the teacher. Teacher weights are mandatory
(``allow_random_teacher: true`` waives them); a missing file or a checkpoint that matches too few teacher
tensors is an error naming the file and the counts.
ppdet's own format (``slim: Distill`` + ``slim_method``, the file being the teacher model config with
``pretrain_weights`` as teacher weights) is translated to the generic ``Distiller`` by
:mod:`ppdistill.upstream`.
"""
import difflib
import inspect
import os
from typing import Dict, List, Optional, Tuple

import paddle.nn as nn
import yaml
from ppdet.core.workspace import create, global_config, load_config, merge_config
from ppdet.core.config.schema import SchemaDict
from ppdet.utils.logger import setup_logger

from .checkpoint import load_state_file
from .config_scope import create_fresh, isolated_scope
from .distiller import DistillConfigError, Distiller
from .fast_teacher import attach_teacher_path, check_teacher_mode
from .presets import select_preset
from .upstream import translate

logger = setup_logger(__name__)

__all__ = ['load_distill_config', 'build_distiller', 'build_teacher', 'load_checked_weights',
           'is_distill_config', 'check_teacher_is_not_student']

DISTILL_KEYS = ('slim', 'teacher_config', 'teacher_weights', 'allow_random_teacher', 'teacher_min_match',
                'teacher_mode', 'teacher_dtype')


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


def _distiller_names() -> list:
    return sorted(k for k in global_config if _distiller_class(k) is not None)


def is_distill_config(path: str) -> bool:
    """True for a ppdistill distill config or ppdet's ``slim: Distill`` format.

    Decided by the distill keys (``teacher_config`` ...) as well as the ``slim`` name, so a misspelt
    ``slim:`` gets ppdistill's error instead of falling through to ppdet's pruning/quantisation path.
    """
    raw = _read_yaml(path)
    slim = raw.get('slim')
    return (slim == 'Distill' or _distiller_class(slim) is not None
            or any(key in raw for key in DISTILL_KEYS if key != 'slim'))


def _resolve_config_path(value: str, base_dir: str) -> str:
    for candidate in (os.path.join(base_dir, value), value):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise DistillConfigError(f"teacher_config '{value}' not found (looked relative to {base_dir} and the "
                             'current directory)')


def load_distill_config(path: str, overrides: Optional[dict] = None) -> dict:
    """Validate a distill config and merge only its distill keys into ppdet's global config.

    ``overrides``: the command line's ``-o`` values; its distill keys (``allow_random_teacher``,
    ``teacher_weights`` ...) replace the file's before the checks, as they do for the run.
    Sets ``filename`` to the distill config's name, so outputs go to ``<save_dir>/<distill name>/``.
    """
    raw = _read_yaml(path)
    student = {}
    if raw.get('slim') == 'Distill':
        raw, translation = translate(raw, path)
        student = translation.student
    raw.update({k: v for k, v in (overrides or {}).items() if k in DISTILL_KEYS})
    slim = raw.get('slim')
    if _distiller_class(slim) is None:
        known = _distiller_names()
        close = difflib.get_close_matches(str(slim), known, n=1, cutoff=0.6)
        hint = f'did you mean {close[0]}? ' if close else ''
        raise DistillConfigError(f"{path}: slim: {slim!r} is not a ppdistill distiller; {hint}"
                                 f"distillers: {', '.join(known)}")
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
    merge_config(student)  # the student-config settings the upstream method needs
    global_config['filename'] = os.path.splitext(os.path.basename(path))[0]
    return raw


def _is_url(path: str) -> bool:
    return path.startswith(('http://', 'https://'))


def _candidates(path: str) -> list:
    return [path] if path.endswith('.pdparams') else [path + '.pdparams', path]


def _download(url: str, key: str) -> str:
    """ppdet's cached download; any failure is one line naming the URL, the reason and the way out."""
    from ppdet.utils.download import get_weights_path
    try:
        return get_weights_path(url)
    except Exception as err:  # noqa: BLE001 - requests/OSError/RuntimeError: all mean "not downloadable"
        inner = getattr(err.args[0], 'reason', None) if err.args else None  # urllib3's MaxRetryError
        reason = ' '.join(f'{type(err).__name__}: {inner or err}'.split())
        raise DistillConfigError(
            f'cannot download {url} ({reason}); download it where there is network access and set '
            f'{key} to the local .pdparams file instead') from None


def _weights_file(path: str, key: str = 'teacher_weights') -> str:
    """The local ``.pdparams`` file for ``path`` (suffix optional; URLs downloaded into ppdet's cache)."""
    if _is_url(path):
        path = _download(path, key)
    candidates = _candidates(path)
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise DistillConfigError(f"weights file not found: {candidates[0]}")


def _same_weights(a: str, b: str) -> bool:
    """Whether two weights settings name the same checkpoint (no download: URLs compare as strings)."""
    if _is_url(a) or _is_url(b):
        return a == b
    found = [next((c for c in _candidates(p) if os.path.isfile(c)), _candidates(p)[0]) for p in (a, b)]
    if all(os.path.isfile(f) for f in found):
        return os.path.samefile(*found)
    return os.path.abspath(found[0]) == os.path.abspath(found[1])


def check_teacher_is_not_student(student_config: str, cfg: dict, resume: Optional[str] = None) -> None:
    """Self-distillation (``teacher_config`` = the student's config) only makes sense from other weights.

    Logs a warning when the two configs are the same file, and raises :class:`DistillConfigError` when the
    teacher weights are also the student's ``pretrain_weights`` or ``-r`` checkpoint.
    """
    teacher_config = cfg.get('teacher_config')
    if not (teacher_config and os.path.isfile(student_config) and os.path.isfile(teacher_config)
            and os.path.samefile(student_config, teacher_config)):
        return
    logger.warning(f'teacher_config is the student config ({student_config}): teacher and student are the '
                   'same architecture (self-distillation); this only helps if teacher_weights is a '
                   'better-trained checkpoint than the student starts from')
    teacher_weights = cfg.get('teacher_weights')
    for key, weights in (('pretrain_weights', cfg.get('pretrain_weights')), ('-r/--resume', resume)):
        if teacher_weights and weights and _same_weights(str(teacher_weights), str(weights)):
            raise DistillConfigError(
                f'teacher_config is the student config and teacher_weights ({teacher_weights}) is the '
                f"student's {key} ({weights}): the teacher would be the student itself; point "
                'teacher_weights at a trained teacher checkpoint')


def _unique_tensors(state: dict) -> Dict[int, List[str]]:
    """A model's state dict grouped by tensor: names of one tensor registered under several names (PicoHeadV2
    keeps each class conv in ``head_cls_list.<i>`` and ``head_cls<i>``) count once."""
    groups: Dict[int, List[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    return groups


def _list(names: List[str], limit: int = 3) -> str:
    more = f' (+{len(names) - limit} more)' if len(names) > limit else ''
    return ', '.join(names[:limit]) + more


def load_checked_weights(model: nn.Layer, path: str, min_match: float = 0.95,
                         role: str = 'teacher') -> Tuple[int, int]:
    """Load ``path`` into ``model``; returns ``(matched, total)`` distinct tensors (aliases count once).

    A tensor of the file whose name is the model's but whose shape differs (a checkpoint of another class
    count, width or anchor layout) is an error naming it: that layer would stay random. Fewer than
    ``min_match`` of the model's tensors found by name is an error; any tensor not found at all is named in
    a warning (it keeps its initialisation).
    """
    file = _weights_file(path, 'teacher_weights' if role == 'teacher' else '-o weights=<file>')
    state = load_state_file(file, f'{role} weights')
    own = model.state_dict()
    # per distinct tensor: the name it has in the file (None: not in the file)
    found = [(names, next((n for n in names if n in state), None)) for names in _unique_tensors(own).values()]
    differ = [f'{k} {list(state[k].shape)} in the file vs {list(own[k].shape)}'
              for _, k in found if k is not None and tuple(state[k].shape) != tuple(own[k].shape)]
    total = len(found)
    if differ:
        raise DistillConfigError(
            f'{role} weights {file}: {len(differ)}/{total} {role} tensors have another shape in the file '
            f'({_list(differ)}); the {role} config must build the checkpoint\'s model (e.g. the same '
            'num_classes, widths and anchors)')
    loaded = [(names, k) for names, k in found if k is not None]
    missing = [names[0] for names, k in found if k is None]
    if len(loaded) < min_match * total:
        raise DistillConfigError(
            f'{role} weights {file} match only {len(loaded)}/{total} {role} tensors by name '
            f'(need {min_match:.0%}); is it a checkpoint of the {role} config?')
    model.set_state_dict({name: state[k] for names, k in loaded for name in names})
    if missing:
        logger.warning(f'{role} weights {file}: {len(missing)}/{total} {role} tensors are not in the '
                       f'file and keep their initialisation ({_list(missing)}); if they are used, give a '
                       f'checkpoint of the {role} config')
    logger.info(f'Loaded {role} weights {file}: {len(loaded)}/{total} tensors matched')
    return len(loaded), total


def build_teacher(config_path: str, weights: Optional[str], allow_random: bool = False,
                  min_match: float = 0.95) -> Tuple[nn.Layer, str]:
    """Build the teacher from ppdet's registered defaults plus its own YAML chain (``_BASE_``) only;
    nothing of the global (student) config reaches it, and the global config is unchanged afterwards.
    Load checked weights."""
    if not weights and not allow_random:
        raise DistillConfigError('teacher_weights is not set (allow_random_teacher: true waives it)')
    if weights:
        _weights_file(weights)  # fail before building anything
    with isolated_scope():
        teacher_cfg = load_config(config_path)
        arch = teacher_cfg.architecture
        teacher = create_fresh(arch)
        eval_size = teacher_cfg.get('eval_size')
    check_fixed_eval_size(teacher, arch, eval_size, config_path)
    if weights:
        load_checked_weights(teacher, weights, min_match, 'teacher')
    else:
        logger.warning('allow_random_teacher: distilling from a RANDOMLY INITIALISED teacher')
    teacher.eval()
    return teacher, arch


def _train_sizes(reader) -> List[Tuple[int, int]]:
    """Every ``(h, w)`` a ppdet reader config's ``target_size`` settings can resize to: ``Resize``'s is one
    size (``[h, w]`` or an int), the random resizes' (``BatchRandomResize``, ``RandomResize``) a list of sizes
    (each ``[h, w]`` or an int); an int is a square."""
    def size(t) -> Tuple[int, int]:
        return (int(t), int(t)) if isinstance(t, int) else (int(t[0]), int(t[-1]))
    sizes = []
    for group in ('sample_transforms', 'batch_transforms'):
        for op in (reader or {}).get(group) or []:
            for name, args in (op or {}).items():
                target = args.get('target_size') if isinstance(args, dict) else None
                if target is not None:
                    sizes += [size(target)] if name == 'Resize' or isinstance(target, int) else \
                        [size(t) for t in target]
    return sizes


def check_fixed_eval_size(teacher: nn.Layer, arch: str, eval_size, config_path: str) -> None:
    """A teacher whose preset row says ``eval_size`` fixes its input size in eval mode (where every teacher
    runs: RT-DETR's position embedding and anchors) must see only that size in the student's training:
    otherwise its forward fails deep inside paddle at the first other size."""
    why = select_preset(arch, teacher).get('fixed_eval_size')
    if not why or not eval_size:
        return
    fixed = (int(eval_size[0]), int(eval_size[-1]))
    other = sorted({size for size in _train_sizes(global_config.get('TrainReader')) if size != fixed})
    if other:
        raise DistillConfigError(
            f"teacher {config_path}: eval_size {list(fixed)} fixes {why} in eval mode, where the teacher runs, but "
            f"the student's TrainReader also resizes to {', '.join(f'{h}x{w}' for h, w in other)}; set eval_size: "
            'null in the teacher config (or train the student at that one size)')


def _config_setting(module: str, key: str):
    """``module.key`` of the current global config (its schema default when not set)."""
    section = global_config.get(module)
    return section[key] if isinstance(section, SchemaDict) else None


def _teacher_settings(config_path: str, wanted: set) -> dict:
    """``{(module, key): value}`` of the teacher config, read as :func:`build_teacher` builds it."""
    with isolated_scope():
        load_config(config_path)
        return {mk: _config_setting(*mk) for mk in wanted}


def fill_model_settings(cfg: dict) -> None:
    """Loss arguments that describe the models' outputs come from the model configs.

    A loss class lists the model settings its comparison depends on in ``model_settings = {name: (module,
    key)}`` (e.g. YOLOv3OutputLoss: ``YOLOv3Head.iou_aware``, which the channel count alone cannot tell,
    and the anchors). Student and teacher must agree on each, else :class:`DistillConfigError`; a name that
    is a constructor argument is set from the configs, and an ``args`` value contradicting them is an error.
    """
    from .distiller import loss_class

    def settings() -> list:
        section = global_config.get(cfg['slim'])
        losses = dict.get(section, 'losses') if isinstance(section, dict) else None
        entries = [e for e in losses or [] if isinstance(e, dict) and isinstance(e.get('type'), str)
                   and isinstance(global_config.get(e['type']), SchemaDict)]
        return [(e, arg, mk) for e in entries
                for arg, mk in getattr(loss_class(e['type']), 'model_settings', {}).items()]
    wanted = {mk for _, _, mk in settings()}
    if not wanted:
        return
    teacher = _teacher_settings(cfg['teacher_config'], wanted)  # restores the global config: read entries after
    for entry, arg, (module, key) in settings():
        student_value, teacher_value = _config_setting(module, key), teacher[(module, key)]
        what = f"{cfg['slim']}: loss {entry.get('name') or entry['type']} ({entry['type']})"
        if student_value != teacher_value:
            raise DistillConfigError(
                f'{what}: the student config sets {module}.{key}: {student_value} but the teacher config '
                f'{teacher_value}; their outputs have different layouts and cannot be compared')
        if arg not in inspect.signature(loss_class(entry['type'])).parameters:
            continue
        if entry.get('args') is None:
            entry['args'] = {}
        args = entry['args']
        if arg in args and args[arg] != student_value:
            raise DistillConfigError(
                f'{what}: args.{arg}: {args[arg]} contradicts {module}.{key}: {student_value} of the student '
                f'and teacher configs; remove {arg} from args (it is read from the model configs)')
        args[arg] = student_value


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
    teacher_path = (cfg.get('teacher_mode', 'eager'), cfg.get('teacher_dtype', 'float32'))
    check_teacher_mode(*teacher_path)
    fill_model_settings(cfg)
    # Student first: with the same seed it starts from the same init as a plain ppdet run.
    student = create_fresh(cfg['architecture'])
    if cfg.get('pretrain_weights'):
        from ppdet.utils.checkpoint import load_pretrain_weight
        load_pretrain_weight(student, cfg['pretrain_weights'])
    teacher, teacher_arch = build_teacher(cfg['teacher_config'], weights,
                                          bool(cfg.get('allow_random_teacher', False)),
                                          float(cfg.get('teacher_min_match', 0.95)))
    distiller = create(cfg['slim'], student_model=student, teacher_model=teacher,
                       student_arch=cfg['architecture'], teacher_arch=teacher_arch)
    attach_teacher_path(distiller, *teacher_path)
    return distiller
