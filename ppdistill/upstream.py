"""ppdet's own distill format (``slim: Distill``) translated to ppdistill's generic :class:`Distiller`.

A ppdet distill file is the teacher's model config (its ``_BASE_`` chain) plus the method:
``slim_method`` (``FGD``, ``CWD``, ``LD``, ``PPYOLOEDistill``) or, without one, ppdet's generic
``DistillModel`` with ``distill_loss`` (``DistillYOLOv3Loss``); ``pretrain_weights`` are the teacher's
weights. Each method becomes a list of loss entries ``{type, student, teacher, levels, weight, args, name}``
(configs/slim/distill/generic_example.yml) written from the upstream numbers, plus the few student-config
settings the method needs, plus the differences from the upstream run, which are logged in one line and
documented in docs/methods.md ("Upstream configs").

What upstream computes per architecture (its ``CWDDistillModel`` distils GFL's class maps *and* neck
features, RetinaNet's neck features only) is a table row here, as tap presets are.
"""
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ppdet.core.workspace import global_config
from ppdet.core.config.schema import SchemaDict
from ppdet.utils.logger import setup_logger

from .distiller import DistillConfigError

logger = setup_logger(__name__)

__all__ = ['Translation', 'translate', 'METHODS', 'CWD_ROLES', 'TEACHER_EVAL']

# Every translated run differs from upstream here (ppdet's trainer calls model.train() on the whole
# DistillModel each epoch, so its teacher runs with batch statistics and updates its running ones).
TEACHER_EVAL = "teacher in eval mode (upstream's is in train mode: BN batch statistics)"

# What ppdet 2.6's CWDDistillModel distils, by student architecture: GFL re-runs the head towers for the
# class maps and also distils the neck features with the same loss; RetinaNet distils the neck features
# (its config names them cls_f_* and declares 80 channels, but the code passes the FPN outputs).
CWD_ROLES: Dict[str, Tuple[str, ...]] = {'GFL': ('cls_logits', 'fpn'), 'RetinaNet': ('fpn',)}

# DistillPPYOLOELoss.feat_distill_place -> tap role; feat_distiller -> (loss, upstream's fixed args, each
# multiplied by loss_weight.feat)
_PLACES = {'neck_feats': 'fpn', 'backbone_feats': 'backbone'}
_PPYOLOE_FEATURES = {
    'fgd': ('FGDLoss', {'alpha_fgd': 1e-5, 'beta_fgd': 5e-6, 'gamma_fgd': 1e-5, 'lambda_fgd': 5e-8}),
    'pkd': ('PKDLoss', {'loss_weight': 1.0}),
    'cwd': ('CWDLoss', {'loss_weight': 1.0}),
    'mimic': ('FeatureMSELoss', {'loss_weight': 1.0}),
}
_FGD_ARGS = ('temp', 'alpha_fgd', 'beta_fgd', 'gamma_fgd', 'lambda_fgd')
_FGD_WEIGHTED = ('alpha_fgd', 'beta_fgd', 'gamma_fgd', 'lambda_fgd')
_CHANNELS = ('student_channels', 'teacher_channels')  # read from the models by ppdistill
_LD_TERMS = ('loss_ld', 'loss_ld_vlr', 'loss_kd')


@dataclass
class Translation:
    """One ppdet distill file in ppdistill terms.

    ``losses``: the Distiller's loss entries; ``student``: student-config settings merged into the global
    config (module sections or shared keys); ``changes``: what differs from the upstream run."""
    method: str
    losses: List[dict]
    changes: List[str] = field(default_factory=list)
    student: Dict[str, object] = field(default_factory=dict)


def _number(value, what: str, path: str) -> float:
    try:  # PyYAML reads 5e-6 (no dot) as a string
        return float(value)
    except (TypeError, ValueError):
        raise DistillConfigError(f'{path}: {what} must be a number, got {value!r}') from None


def _section(raw: dict, path: str, name: str, numbers: Sequence[str], ignored: Sequence[str] = _CHANNELS) -> dict:
    """``raw[name]`` as ``{key: float}`` over ``numbers``; ``normalize: true`` and unknown keys are errors."""
    values = dict(raw.get(name) or {})
    if values.pop('normalize', False):
        raise DistillConfigError(f'{path}: {name}.normalize: true (per-channel standardised features) is not '
                                 'supported by the ppdistill loss it maps to; remove it to distill raw features as '
                                 'the papers do')
    unknown = sorted(set(values) - set(numbers) - set(ignored))
    if unknown:
        raise DistillConfigError(f'{path}: {name} has unknown key(s) {unknown}; it accepts {sorted(numbers)}')
    return {k: _number(values[k], f'{name}.{k}', path) for k in numbers if k in values}


def _levels(names, path: str) -> Optional[list]:
    """ppdet applies one loss per entry of ``distill_loss_name`` to level ``idx = 0..len-1`` (student and
    teacher alike); the names are only log labels."""
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not names:
        raise DistillConfigError(f'{path}: distill_loss_name must be a non-empty list of names (one per level, '
                                  f'from level 0), got {names!r}')
    return list(range(len(names)))


def _entry(type_: str, name: str, student, args: dict, levels: Optional[list] = None) -> dict:
    return {'type': type_, 'name': name, 'student': student, 'teacher': student, 'levels': levels,
            'weight': 1.0, 'args': args}


def _defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def _student(module: str, key: str, default=None):
    """``module.key`` of the student config loaded so far (the module's schema default when not set)."""
    section = global_config.get(module)
    if isinstance(section, SchemaDict) and (key in section or key in section.schema and
                                            section.schema[key].has_default()):
        return section[key]
    return default


# -- the methods ------------------------------------------------------------------------------------
def _fgd(raw: dict, path: str) -> Translation:
    """``FGDFeatureLoss`` on the neck levels; its ``loss_weight`` multiplies the whole per-level loss, which
    equals scaling the four term weights (both classes' defaults are the reference's)."""
    name = raw.get('distill_loss') or 'FGDFeatureLoss'
    args = _section(raw, path, name, _FGD_ARGS + ('loss_weight',))
    weight = args.pop('loss_weight', 1.0)
    if weight != 1.0:
        from .losses import FGDLoss
        defaults = _defaults(FGDLoss)
        args.update({k: weight * args.get(k, defaults[k]) for k in _FGD_WEIGHTED})
    return Translation('FGD', [_entry('FGDLoss', 'fgd', 'fpn', args, _levels(raw.get('distill_loss_name'), path))])


def _cwd(raw: dict, path: str) -> Translation:
    """``CWDFeatureLoss`` (``tau``, ``weight``) on what upstream distils for the architecture (:data:`CWD_ROLES`)."""
    name = raw.get('distill_loss') or 'CWDFeatureLoss'
    values = _section(raw, path, name, ('tau', 'weight'))
    tau, weight = values.get('tau', 1.0), values.get('weight', 1.0)
    arch = global_config.get('architecture')
    if arch not in CWD_ROLES:
        raise DistillConfigError(f"{path}: ppdet's CWD is defined for {sorted(CWD_ROLES)} students, the student "
                                  f"is {arch!r}; write a ppdistill config with CWDLoss on the taps you want")
    levels = _levels(raw.get('distill_loss_name'), path)
    losses = [_entry('CWDLoss', f'cwd_{role}', role, {'tau': tau, 'loss_weight': weight}, levels)
              for role in CWD_ROLES[arch]]
    changes = [] if tau == 1.0 else [f'CWD keeps tau**2 = {tau ** 2:g} (upstream drops it)']
    return Translation('CWD', losses, changes)


def _kl_settings(value, what: str, path: str) -> Tuple[float, float]:
    """``(loss_weight, T)`` of an LDGFLHead ``KnowledgeDistillationKLDivLoss`` setting (a mapping or the class
    name with its defaults)."""
    from ppdet.slim.distill_loss import KnowledgeDistillationKLDivLoss
    settings = dict(_defaults(KnowledgeDistillationKLDivLoss), **(value if isinstance(value, dict) else {}))
    settings.pop('name', None)
    if settings.get('reduction', 'mean') != 'mean':
        raise DistillConfigError(f"{path}: the student's LDGFLHead.{what}.reduction must be 'mean' (LD sums over "
                                  'the region with its own normaliser)')
    return _number(settings['loss_weight'], f'LDGFLHead.{what}.loss_weight', path), \
        _number(settings['T'], f'LDGFLHead.{what}.T', path)


def _gfl_target(path: str) -> dict:
    """The student reader's ``Gt2GFLTarget`` settings (ppdet defaults where not set)."""
    from ppdet.data.transform.batch_operators import Gt2GFLTarget
    reader = global_config.get('TrainReader') or {}
    for op in reader.get('batch_transforms') or []:
        if isinstance(op, dict) and 'Gt2GFLTarget' in op:
            return dict(_defaults(Gt2GFLTarget), **(op['Gt2GFLTarget'] or {}))
    raise DistillConfigError(f"{path}: LD reads the student head's positives from the reader's Gt2GFLTarget, but "
                              "the student's TrainReader.batch_transforms has none; use a GFL student config")


def _ld(raw: dict, path: str) -> Translation:
    """LD lives in the student's ``LDGFLHead`` (``loss_ld``, ``loss_ld_vlr``, ``loss_kd``): the terms become one
    :class:`LDLoss`, and the student head a plain ``GFLHead`` with the same settings (same parameters, so
    the student checkpoint also loads into the LDGFLHead config)."""
    arch = global_config.get('architecture')
    head = _student(arch, 'head') if arch else None
    if head != 'LDGFLHead':
        raise DistillConfigError(f"{path}: ppdet's LD reads its weights from the student's LDGFLHead, but the "
                                  f"student's head is {head!r}; train with the student config upstream pairs "
                                  '(configs/gfl/gfl_slim_ld_r18vd_1x_coco.yml) or write a ppdistill LDLoss config')
    section = {k: v for k, v in dict.items(global_config['LDGFLHead'])}
    (ld_w, ld_t), (vlr_w, vlr_t), (kd_w, kd_t) = [_kl_settings(section.get(k), k, path) for k in _LD_TERMS]
    if vlr_w and vlr_t != ld_t:
        raise DistillConfigError(f'{path}: LDGFLHead.loss_ld.T ({ld_t:g}) and loss_ld_vlr.T ({vlr_t:g}) differ; '
                                  "ppdistill's LDLoss has one temperature for both regions")
    target = _gfl_target(path)
    args = {'temperature': ld_t, 'ld_weight': ld_w, 'vlr_weight': vlr_w, 'kd_weight': kd_w, 'kd_temperature': kd_t,
            'normalize': 'reference', 'strides': list(section.get('fpn_stride', _student('LDGFLHead', 'fpn_stride'))),
            'grid_cell_scale': float(target['grid_cell_scale']), 'cell_offset': float(target['cell_offset']),
            # ppdet 2.6.0's get_vlr_region measures the band with intersection over the anchor's area
            'band_overlap': 'iof'}
    plain = {k: v for k, v in section.items() if k not in _LD_TERMS}
    changes = [f"the student's LDGFLHead is built as a GFLHead with its settings ({arch}.head: GFLHead)",
               'an image without boxes gives a zero VLR (upstream crashes)']
    student = {arch: {'head': 'GFLHead'}, 'GFLHead': plain}
    if vlr_w and not target['compute_vlr_region']:
        # Gt2GFLTarget drops gt_bbox from the batch, so the VLR must come from the reader (upstream's LDGFLHead
        # reads vlr_regions too, which its gfl_reader.yml leaves off)
        student['TrainReader'] = {'batch_transforms': [
            {'Gt2GFLTarget': dict(op['Gt2GFLTarget'] or {}, compute_vlr_region=True)}
            if isinstance(op, dict) and 'Gt2GFLTarget' in op else op
            for op in global_config['TrainReader']['batch_transforms']]}
        changes.append("the reader's Gt2GFLTarget computes the VLR (compute_vlr_region: true)")
    return Translation('LD', [_entry('LDLoss', 'ld', {'cls': 'cls_logits', 'reg': 'dfl_logits'}, args)], changes,
                       student)


def _ppyoloe(raw: dict, path: str) -> Translation:
    """``DistillPPYOLOELoss``: class = binary KD (beta 2) over the assigned-score sum, iou = GIoU between decoded boxes, dfl = KL
    at T 1 on each edge's distribution over the positives, feature term on the neck; upstream weights
    ``loss_weight.logits * logits_loss_weight.<term>`` and ``loss_weight.feat``."""
    from ppdet.slim.distill_loss import DistillPPYOLOELoss
    name = raw.get('distill_loss') or 'DistillPPYOLOELoss'
    cfg = _defaults(DistillPPYOLOELoss)
    unknown = sorted(set(raw.get(name) or {}) - set(cfg))
    if unknown:
        raise DistillConfigError(f'{path}: {name} has unknown key(s) {unknown}; it accepts {sorted(cfg)}')
    given = dict(raw.get(name) or {})
    for key in ('loss_weight', 'logits_loss_weight', 'logits_ld_params'):  # a partial mapping keeps the defaults
        given[key] = dict(cfg[key], **(given.get(key) or {}))
    cfg.update(given)
    weight = {k: _number(v, f'{name}.loss_weight.{k}', path) for k, v in cfg['loss_weight'].items()}
    term = {k: _number(v, f'{name}.logits_loss_weight.{k}', path) for k, v in cfg['logits_loss_weight'].items()}
    losses, changes = [], ['no x0.125 on the whole loss (upstream multiplies det + distill by 0.125, an 8x smaller '
                           'SGD step: scale base_lr by 0.125 to reproduce it)',
                           "the student keeps its own label assignment (upstream copies the teacher's)"]
    head = {'cls': 'cls_logits', 'reg': 'dfl_logits'}
    if cfg['logits_distill'] and weight['logits'] > 0:
        w = weight['logits']
        bins = int(_student('PPYOLOEHead', 'reg_max', 16)) + 1  # LDLoss's KL is a mean over the bins
        losses += [
            _entry('BinaryKDLoss', 'kd_cls', 'cls_logits',
                   {'beta': 2.0, 'normalize': 'assigned_scores', 'loss_weight': w * term['class']}),
            _entry('BoxKDLoss', 'kd_iou', head, {'box_coder': 'dfl', 'normalize': 'positives',
                                                  'loss_weight': w * term['iou']}),
            _entry('LDLoss', 'kd_dfl', head, {'temperature': 1.0, 'ld_weight': w * term['dfl'] * bins,
                                              'vlr_weight': 0.0, 'kd_weight': 0.0, 'normalize': 'mean'})]
        changes += ['iou: GIoU at every location weighted by the class-probability gap over N_pos (upstream: '
                    'positives weighted by assigned scores)',
                    "dfl: weighted by the student's max score (upstream: by assigned scores)"]
        if cfg['logits_ld_distill']:
            params = dict(cfg['logits_ld_params'])
            changes.append(f"main_kd dropped (softmax KL at T {params.get('T')} over sigmoid probabilities, weight "
                           f"{params.get('weight')}: mis-specified)")
    if cfg['feat_distill'] and weight['feat'] > 0:
        place, kind = cfg['feat_distill_place'], cfg['feat_distiller']
        if place not in _PLACES or kind not in _PPYOLOE_FEATURES:
            raise DistillConfigError(f'{path}: {name}.feat_distill_place {place!r} / feat_distiller {kind!r}: '
                                      f'ppdistill translates places {sorted(_PLACES)} with distillers '
                                      f'{sorted(_PPYOLOE_FEATURES)} (upstream mgd uses an SSIM loss it has not)')
        loss, args = _PPYOLOE_FEATURES[kind]
        losses.append(_entry(loss, f'feat_{kind}', _PLACES[place], {k: weight['feat'] * v for k, v in args.items()}))
        if kind != 'pkd':  # PKD standardises the features itself
            changes.append(f'{kind} on raw features (upstream standardises each channel first)')
    if not losses:
        raise DistillConfigError(f'{path}: {name} distils nothing (logits_distill and feat_distill off or weight 0)')
    # for_distill makes ppdet's head keep its first task-aligned assignment for every later step unless a
    # teacher's overwrites it each step (upstream's distill model); ppdistill reads the head through taps.
    return Translation('PPYOLOEDistill', losses, changes, {'for_distill': False})


def _distill_model(raw: dict, path: str) -> Translation:
    """ppdet's generic ``DistillModel``: only ``DistillYOLOv3Loss`` runs there (others crash upstream)."""
    name = raw.get('distill_loss')
    if name != 'DistillYOLOv3Loss':
        raise DistillConfigError(f"{path}: ppdet distill format without slim_method uses ppdet's generic "
                                  f'DistillModel, which ppdistill translates for distill_loss: DistillYOLOv3Loss '
                                  f'only (got {name!r}); write a ppdistill config (configs/slim/distill/)')
    weight = _section(raw, path, name, ('weight',)).get('weight', 1000.0)
    args = {'mode': 'obj_scaled', 'loss_weight': weight}
    return Translation('DistillModel/DistillYOLOv3Loss', [_entry('YOLOv3OutputLoss', 'yolov3kd', 'yolo_output', args)])


METHODS: Dict[Optional[str], Callable[[dict, str], Translation]] = {
    'FGD': _fgd, 'CWD': _cwd, 'LD': _ld, 'PPYOLOEDistill': _ppyoloe, None: _distill_model}


def _teacher_weights(raw: dict, path: str) -> Optional[str]:
    """ppdet loads the file's ``pretrain_weights`` into the teacher; ppdistill's ``teacher_weights`` works too."""
    weights, pretrain = raw.get('teacher_weights'), raw.get('pretrain_weights')
    if weights and pretrain and weights != pretrain:
        raise DistillConfigError(f'{path}: teacher_weights ({weights}) and pretrain_weights ({pretrain}) both name '
                                  "the teacher checkpoint in ppdet's distill format; keep one")
    return weights or pretrain


def translate(raw: dict, path: str) -> Tuple[dict, Translation]:
    """A ppdet ``slim: Distill`` file (``raw``, read from ``path``) -> ``(ppdistill distill config, translation)``.

    Reads the student config already in ppdet's global config (its architecture, LD's head settings); logs
    the translation and every difference from the upstream run in one line."""
    method = raw.get('slim_method')
    if method not in METHODS:
        known = ', '.join(str(k) for k in METHODS if k)
        raise DistillConfigError(f'{path}: ppdet distill format with slim_method={method!r} has no ppdistill '
                                  f'translation (ppdet methods: {known}, or none with distill_loss: '
                                  'DistillYOLOv3Loss); write a ppdistill distill config (see configs/slim/distill/)')
    result = METHODS[method](raw, path)
    result.changes.append(TEACHER_EVAL)
    cfg = {'slim': 'Distiller', 'teacher_config': os.path.abspath(path), 'teacher_weights': _teacher_weights(raw, path),
           'losses': result.losses}
    cfg.update({k: raw[k] for k in ('allow_random_teacher', 'teacher_min_match', 'teacher_mode', 'teacher_dtype') if k in raw})
    terms = ', '.join(f"{e['name']}={e['type']}({e['student']}, {e['args']})" for e in result.losses)
    student = f"; student config sets {', '.join(result.student)}" if result.student else ''
    logger.info(f'{path}: ppdet {result.method} translated to {terms}{student}; changed from upstream: '
                + '; '.join(result.changes))
    return cfg, result
