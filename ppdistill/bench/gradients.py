"""Does a distill term pull the student with the detection loss or against it?

For each method and batch (the student's train reader, same batches for every method), one distiller step
without update: the teacher forward, the student forward with its detection loss, every distill term and
sub-term (FGD's fg/bg/mask/rela), and each one's gradient with respect to the student's own parameters
(the align convs, generators and context blocks are not the student and are left out). Per term it
reports, as medians over the batches:

- ``value / det``: the term's weighted value over the detection loss (what the loss-balance log shows);
- ``|grad| / |grad det|``: how hard it pulls the student, relative to the detection loss;
- ``cos``: the cosine between its gradient and the detection loss's (> 0: helps the task's own descent
  direction on this batch; < 0: conflicts with it), and the fraction of batches where it is negative.
- ``task step kept``: how much of the detection loss's first-order descent survives when the term is
  added, for the two optimizers. SGD steps along the summed gradient: ``(g_det + g)·g_det / |g_det|²``
  (= 1 + grad ratio x cos, so ~1 for a term orthogonal to the task). AdamW's first step is
  ``lr·g/(|g| + eps)`` per element, i.e. the sign of the summed gradient: ``sign(g_det + g)·g_det /
  |g_det|_1`` (1 for the detection loss alone). Under AdamW a term takes over every parameter where its
  gradient is the larger one, even when it is orthogonal to the task: that parameter's step then no longer
  serves detection, which a lower learning rate for the task would also do.

A term can be small in value and still dominate the gradient (or the reverse); a persistently negative
cosine with a large gradient ratio is a term that trains the student away from the task. The student is
the config's fresh initialisation (the start of training) or ``--student_weights`` (e.g. the end).
"""
from typing import Dict, List, Optional, Sequence

import numpy as np

from ppdistill.errors import PPDistillError
from ppdistill.gradients import flat_gradient, student_parameters

from . import write_report
from .workbench import BenchSetup, seed_all

__all__ = ['gradient_report', 'term_gradients', 'group_masks']


def group_masks(d, groups: Sequence[str]) -> Dict[str, np.ndarray]:
    """``{prefix: bool mask over the flat gradient of student_parameters(d)}`` for each student sublayer
    name prefix (e.g. ``head.conv_feat``): the parameters under it. A prefix matching none is an error."""
    names = {id(p): n for n, p in d.student_model.named_parameters()}
    params = student_parameters(d)
    sizes = [int(np.prod(p.shape)) for p in params]
    masks = {}
    for prefix in groups:
        inside = [names[id(p)] == prefix or names[id(p)].startswith(prefix + '.') for p in params]
        if not any(inside):
            tops = sorted({names[id(p)].split('.')[0] for p in params})
            raise PPDistillError(f"--groups: no student parameter under '{prefix}' (top-level sublayers: "
                                 f"{', '.join(tops)}; name a sublayer prefix such as head.conv_feat)")
        masks[prefix] = np.repeat(np.array(inside), sizes)
    return masks


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def term_gradients(d, batch: dict, masks: Optional[Dict[str, np.ndarray]] = None,
                   against: Sequence[str] = ()) -> Dict[str, dict]:
    """``{term: {'ratio', 'grad_ratio', 'cos', 'sgd_keep', 'adam_keep'[, 'grad_ratio@<group>', 'cos@<group>']}}``
    for one batch: every distill term and sub-term of distiller ``d`` (and ``distill_loss``, their sum)
    against the student's detection loss; with ``masks`` (:func:`group_masks`) also the norm ratio and
    cosine restricted to each parameter group (where in the student a term pulls with or against the task);
    with ``against`` (names of the student's own loss outputs, e.g. ``loss_vfl``) also ``'cos~<name>'``, the
    cosine with that detection term's gradient (which part of the task a term pulls with or against)."""
    d.train()
    seen = d.inspect(batch)
    terms = dict(seen.terms, distill_loss=seen.distill_loss)
    params = student_parameters(d)
    det = seen.det_loss
    missing = [name for name in against if name not in seen.outputs]
    if missing:
        found = sorted(k for k in seen.outputs if k.startswith('loss'))
        raise PPDistillError(f"--against: the student's outputs have no {missing} (its loss terms: {', '.join(found)})")
    g_parts = {name: flat_gradient(seen.outputs[name], params) for name in against}
    g_det = flat_gradient(det, params)
    n_det, det_value = np.linalg.norm(g_det), float(det)
    l1_det = np.abs(g_det).sum()
    result = {}
    for key, value in terms.items():
        g = flat_gradient(value, params)
        n = np.linalg.norm(g)
        result[key] = {'ratio': float(value) / det_value, 'grad_ratio': float(n / n_det),
                       'cos': _cos(g, g_det),
                       'sgd_keep': float((g_det + g) @ g_det / n_det ** 2),
                       'adam_keep': float(np.sign(g_det + g) @ g_det / l1_det)}
        for name, g_part in g_parts.items():
            result[key][f'cos~{name}'] = _cos(g, g_part)
        for group, mask in (masks or {}).items():
            n_group = np.linalg.norm(g_det[mask])
            result[key][f'grad_ratio@{group}'] = float(np.linalg.norm(g[mask]) / n_group) if n_group > 0 else 0.0
            result[key][f'cos@{group}'] = _cos(g[mask], g_det[mask])
    return result


def summarise(per_batch: List[Dict[str, dict]]) -> Dict[str, dict]:
    """Medians over batches, plus the fraction of batches whose cosine is negative."""
    out = {}
    for key in per_batch[0]:
        rows = [b[key] for b in per_batch]
        out[key] = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
        out[key]['cos_negative'] = float(np.mean([r['cos'] < 0 for r in rows]))
    return out


def markdown(result: dict) -> str:
    lines = [f"# Distill-term gradients: {result['arch']}", '',
             f"- date: {result['date']}", f"- command: `{result['command']}`",
             f"- student: {result['student']}; teacher: {result['teacher']}; {result['batches']} batches "
             f"(seed {result['seed']})", '',
             'Medians over batches. `value/det`: the weighted term over the detection loss; `|∇|/|∇det|`: its '
             "gradient norm on the student's parameters over the detection loss's; `cos`: cosine between the "
             'two gradients (< 0: the term pulls against the task on that batch). Task step kept: the share '
             "of the detection loss's first-order descent left when the term is added, for an SGD step and for "
             "AdamW's first (sign-like) step.", '']
    groups, against = result.get('groups') or [], result.get('against') or []
    if against:
        lines += ["Against the detection terms (`--against`): the cosine of each term's gradient with that term's "
                  'of the detection loss, over all student parameters.', '']
    if groups:
        lines += ['Per parameter group (`--groups`, student sublayer prefixes): the same norm ratio and cosine '
                  "restricted to that group's parameters, `ratio / cos`.", '']
    for method, terms in result['methods'].items():
        lines += [f'## {method}', '', '| term | value/det | abs grad / abs grad det | cos | batches with cos < 0 '
                  '| task step kept, SGD | task step kept, AdamW |', '|---|---|---|---|---|---|---|']
        lines += [f"| `{k}` | {v['ratio']:.3g} | {v['grad_ratio']:.3g} | {v['cos']:+.3f} | "
                  f"{v['cos_negative']:.0%} | {v['sgd_keep']:.0%} | {v['adam_keep']:.0%} |" for k, v in terms.items()]
        lines.append('')
        if groups:
            lines += ['| term | ' + ' | '.join(f'`{g}`' for g in groups) + ' |', '|---|' + '---|' * len(groups)]
            lines += [f'| `{k}` | ' + ' | '.join(f"{v[f'grad_ratio@{g}']:.3g} / {v[f'cos@{g}']:+.3f}" for g in groups)
                      + ' |' for k, v in terms.items()]
            lines.append('')
        if against:
            lines += ['| term | ' + ' | '.join(f'cos with `{a}`' for a in against) + ' |', '|---|' + '---|' * len(against)]
            lines += [f'| `{k}` | ' + ' | '.join(f"{v[f'cos~{a}']:+.3f}" for a in against) + ' |' for k, v in terms.items()]
            lines.append('')
    return '\n'.join(lines)


def gradient_report(args, arch: str, methods: Dict[str, str], teacher_cfg: str, student_cfg: str,
                    out_dir: str, command: str, date: str) -> dict:
    """``tools/benchmark.py gradients``: writes ``<out>/gradients_<arch>.{md,json}``."""
    args.warmup = 0
    seed_all(args.seed)  # the same batches and fresh student on every call
    setup = BenchSetup(args, methods, teacher_cfg, student_cfg, build_student=False, seed=args.seed)
    if args.student_weights:
        from ppdistill.checkpoint import load_state_file
        path = args.student_weights
        state = load_state_file(path if path.endswith('.pdparams') else path + '.pdparams', 'student weights')
    else:  # every method sees the same fresh student
        state = next(iter(setup.distillers.values())).student_model.state_dict()
    for d in setup.distillers.values():
        d.student_model.set_state_dict(state)
    groups = [g for g in (getattr(args, 'groups', None) or '').split(',') if g]
    against = [a for a in (getattr(args, 'against', None) or '').split(',') if a]
    result = {'arch': arch, 'date': date, 'command': command, 'batches': len(setup.batches), 'seed': args.seed,
              'student': args.student_weights or 'fresh initialisation', 'teacher': args.teacher_weights,
              'groups': groups, 'against': against, 'methods': {}}
    for name, d in setup.distillers.items():
        seed_all(args.seed)  # a method's random draws (MGD's masks) do not depend on the methods before it
        print(f'[bench] gradients {arch}: {name}', flush=True)
        masks = group_masks(d, groups)
        result['methods'][name] = summarise([term_gradients(d, b, masks, against) for b in setup.batches])
    write_report(out_dir, f'gradients_{arch}', markdown(result), result)
    return result
