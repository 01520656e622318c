"""What a distill step costs against its limit, and what the distill losses cost alone.

In one process, on the same batches, interleaved step by step (so machine load hits every variant alike):

- ``student[m]``: the plain student's train step (forward with loss, backward, optimizer step), on the
  student inside method ``m``'s distiller (same weights; all optimizers use learning rate 0, so the
  weights never change and every variant sees the same model);
- ``teacher[m]``: method ``m``'s teacher forward up to its last tap, without gradient, on today's (eager)
  path; ``teacher_fast[m]``: the same taps from the fast path (:mod:`ppdistill.fast_teacher`);
- ``distill[m]`` / ``distill_fast[m]``: the distiller's train step (teacher + student + distill losses,
  backward, step) with the eager / the fast teacher path;
- ``loss[m]``: the method's distill losses alone, forward + backward on detached recorded features;
- ``fgd_ours`` / ``fgd_ppdet``: for FGD terms, our ``FGDLoss`` and ppdet 2.6's ``FGDFeatureLoss`` forward
  on the same tensors.

Per method: ``limit = student + teacher`` (today's teacher forward), ``ratio = distill / limit``,
``fast_ratio = distill_fast / limit`` (the fast path's target: <= 0.90) and the framework overhead
``distill / (limit + loss)`` (1.0 = the distiller adds nothing beyond the work it must do), each from the
medians over the timed steps (after warm-up). A teacher the fast path cannot serve gets no fast variants. Peak memory of student-only, teacher-only and distill runs
is measured in one subprocess each (``ru_maxrss`` on CPU, ``max_memory_allocated`` on GPU).
"""
import json
import os
import resource
import sys
import time
from typing import Callable, Dict, List

import numpy as np
import paddle

from . import write_report
from .workbench import BenchSetup, teacher_settings

__all__ = ['speed_benchmark']

_MEMORY_TAG = 'PPDISTILL_MEMORY '


def _sync() -> None:
    if paddle.device.get_device().startswith('gpu'):
        paddle.device.cuda.synchronize()


def _timed(fn: Callable[[], None]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _train_step(model, opt, batch) -> None:
    model.train()
    loss = model(batch)['loss']
    loss.backward()
    opt.step()
    opt.clear_grad()


def _leaf(x):
    """A detached copy of a loss input (a tensor or ``{name: tensor}``) that takes gradients again."""
    if isinstance(x, dict):
        return {k: _leaf(v) for k, v in x.items()}
    x = x.detach()
    x.stop_gradient = False
    return x


def _recorded_features(d, batch) -> dict:
    """``{term key: (student, teacher)}`` as a distill step feeds its losses, the student a fresh leaf (the
    losses' backward stops there)."""
    d.train()
    with paddle.no_grad():
        seen = d.inspect(batch)
    return {key: (_leaf(s), t) for key, (s, t) in seen.term_inputs.items()}


def _loss_step(d, pairs, batch) -> None:
    terms = d.distill_terms(batch, pairs)
    paddle.add_n([terms[key] for key in pairs]).backward()
    d.distill_losses.clear_gradients()


def _valid_boxes(batch) -> dict:
    """The batch with ``gt_bbox`` as a list of each image's real boxes (what ppdet's FGD loss iterates)."""
    from ppdistill.masks import pad_boxes
    boxes, valid = pad_boxes(batch['gt_bbox'], batch.get('pad_gt_mask'))
    keep = valid.numpy()
    per_image = [paddle.to_tensor(boxes.numpy()[i][keep[i]].reshape([-1, 4])) for i in range(len(keep))]
    return {'gt_bbox': per_image, 'im_shape': batch['im_shape'], 'image': batch['image']}


def ppdet_fgd_runs() -> bool:
    """Whether ppdet's ``FGDFeatureLoss`` runs on this paddle (one toy box); says so when it does not.

    ppdet 2.6 and PaddleDetection develop divide a float by int32 box extents there, which paddle 3's
    type promotion refuses (``TypeError``)."""
    from ppdet.slim.distill_loss import FGDFeatureLoss
    x = paddle.rand([1, 4, 8, 8])
    try:
        FGDFeatureLoss(4, 4)(x, x, {'gt_bbox': [paddle.to_tensor([[1., 1., 4., 4.]])],
                                    'im_shape': paddle.to_tensor([[8., 8.]])})
    except TypeError as err:
        print(f"[bench] ppdet's FGDFeatureLoss fails on paddle {paddle.__version__} "
              f"({str(err).splitlines()[0][:100]}): no FGD forward comparison", flush=True)
        return False
    return True


def _fgd_pairs(d, reference: bool) -> list:
    """``(term index, term key, our FGDLoss, ppdet FGDFeatureLoss or None)`` with the same settings, per FGD
    term (``None`` unless ``reference``)."""
    from ppdet.slim.distill_loss import FGDFeatureLoss
    from ppdistill.losses import FGDLoss
    found = []
    for i, (key, loss) in enumerate(d.term_losses().items()):
        if isinstance(loss, FGDLoss):
            theirs = FGDFeatureLoss(loss.student_channels, loss.teacher_channels, temp=loss.temp,
                                    alpha_fgd=loss.alpha_fgd, beta_fgd=loss.beta_fgd,
                                    gamma_fgd=loss.gamma_fgd, lambda_fgd=loss.lambda_fgd) if reference else None
            found.append((i, key, loss, theirs))
    return found


def _fast_teacher(d):
    """The distiller's fast teacher (built here if its config keeps the eager path), or None when the fast
    path cannot serve it (the reason is printed)."""
    from ppdistill.fast_teacher import try_fast_teacher
    if d.fast_teacher is not None:
        return d.fast_teacher
    fast, why = try_fast_teacher(d)
    if fast is None:
        print(f'[bench] no fast teacher path: {why}', flush=True)
    return fast


def measure_times(setup: BenchSetup, warmup: int) -> Dict[str, List[float]]:
    """Seconds per variant per step, all variants interleaved on each batch."""
    from ppdistill.losses.base import loss_total
    times: Dict[str, List[float]] = {}
    # The plain student step runs on each distiller's own student: same weights as its distill step.
    s_opts = {m: setup.optimizer(d.student_model) for m, d in setup.distillers.items()}
    d_opts = {m: setup.optimizer(d) for m, d in setup.distillers.items()}
    reference = any(_fgd_pairs(d, False) for d in setup.distillers.values()) and ppdet_fgd_runs()
    fgd = {m: _fgd_pairs(d, reference) for m, d in setup.distillers.items()}
    fast = {m: _fast_teacher(d) for m, d in setup.distillers.items()}
    for step, batch in enumerate(setup.batches):
        sample = {}
        for m, d in setup.distillers.items():
            sample[f'student[{m}]'] = _timed(lambda: _train_step(d.student_model, s_opts[m], batch))
            sample[f'teacher[{m}]'] = _timed(lambda: d.eager_teacher_features(batch))
            d.fast_teacher = None
            sample[f'distill[{m}]'] = _timed(lambda: _train_step(d, d_opts[m], batch))
            if fast[m] is not None:
                sample[f'teacher_fast[{m}]'] = _timed(lambda: fast[m](batch))
                d.fast_teacher = fast[m]
                sample[f'distill_fast[{m}]'] = _timed(lambda: _train_step(d, d_opts[m], batch))
            pairs = _recorded_features(d, batch)
            sample[f'loss[{m}]'] = _timed(lambda: _loss_step(d, pairs, batch))
            if fgd[m]:
                listed = _valid_boxes(batch)
                for i, key, ours, theirs in fgd[m]:
                    s, t = pairs[key]
                    sample[f'fgd_ours[{m}/l{i}]'] = _timed(lambda: loss_total(ours(s, t, listed)))
                    if theirs is not None:
                        sample[f'fgd_ppdet[{m}/l{i}]'] = _timed(lambda: theirs(s, t, listed))
        if step >= warmup:
            for key, value in sample.items():
                times.setdefault(key, []).append(value)
    return times


def _quartiles(values: np.ndarray) -> List[float]:
    return [float(q) for q in np.percentile(values, [25, 50, 75])]


def summarise(times: Dict[str, List[float]], methods) -> dict:
    """Medians (ms) per variant and, per method, limit / ratio / loss compute / overhead.

    ``ratio`` and ``overhead`` are ratios of the medians; ``ratio_q`` / ``overhead_q`` are the quartiles
    (25/50/75%) of the same ratios taken step by step (the variants of one step ran back to back, so a load
    swing on this machine hits numerator and denominator alike): their spread is the measurement's noise,
    against which a target like 1.03 is read.
    """
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    rows = {}
    for m in methods:
        limit = med[f'student[{m}]'] + med[f'teacher[{m}]']
        distill, loss = med[f'distill[{m}]'], med[f'loss[{m}]']
        step = {k: np.asarray(times[f'{k}[{m}]']) for k in ('student', 'teacher', 'distill', 'loss')}
        step_limit = step['student'] + step['teacher']
        row = {'student_ms': med[f'student[{m}]'], 'teacher_ms': med[f'teacher[{m}]'], 'limit_ms': limit,
               'distill_ms': distill, 'ratio': distill / limit, 'loss_ms': loss,
               'overhead': distill / (limit + loss),
               'ratio_q': _quartiles(step['distill'] / step_limit),
               'overhead_q': _quartiles(step['distill'] / (step_limit + step['loss']))}
        if f'distill_fast[{m}]' in med:
            fast = np.asarray(times[f'distill_fast[{m}]'])
            row.update(teacher_fast_ms=med[f'teacher_fast[{m}]'], distill_fast_ms=med[f'distill_fast[{m}]'],
                       fast_ratio=med[f'distill_fast[{m}]'] / limit, fast_ratio_q=_quartiles(fast / step_limit))
        ours = sorted(k for k in med if k.startswith(f'fgd_ours[{m}/') and k.replace('_ours', '_ppdet') in med)
        if ours:
            row['fgd_forward'] = [{'term': k[len('fgd_ours['):-1], 'ours_ms': med[k],
                                   'ppdet_ms': med[k.replace('fgd_ours', 'fgd_ppdet')],
                                   'speedup': med[k.replace('fgd_ours', 'fgd_ppdet')] / med[k]}
                                  for k in ours]
        rows[m] = row
    steps = min((len(v) for v in times.values()), default=0)
    return {'median_ms': med, 'steps': steps, 'methods': rows}


# -- peak memory: one subprocess per role --------------------------------------------------------------
def _current_rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


class _RssSampler:
    """Peak of the process's current RSS, sampled every ``interval`` s in a thread (Linux ``/proc``).

    ``ru_maxrss`` cannot be reset, so it would report the import-time peak of paddle for small models;
    sampling the current RSS measures what building and running the models add on top of the imports.
    """

    def __init__(self, interval: float = 0.002):
        import threading
        self.peak = _current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, _current_rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _current_rss_mb())


def memory_role(args, methods: Dict[str, str], teacher_cfg: str, student_cfg: str) -> None:
    """Child process: build and run ``args.memory_role`` (student | teacher | <method>) over the batches
    and print its memory: ``above_import_mb`` = peak RSS (sampled) minus the RSS after the imports, so
    model build, data and steps count and the interpreter and libraries do not. ``teacher`` is the teacher
    alone, inference under ``no_grad``."""
    from ppdistill.build import build_teacher
    role = args.memory_role
    baseline = _current_rss_mb()
    sampler = _RssSampler()
    setup = BenchSetup(args, {role: methods[role]} if role in methods else {}, teacher_cfg, student_cfg,
                   build_student=role == 'student')
    if role == 'student':
        opt = setup.optimizer(setup.student)
        step = lambda b: _train_step(setup.student, opt, b)  # noqa: E731
    elif role == 'teacher':
        settings = teacher_settings(args, teacher_cfg)
        teacher, _ = build_teacher(teacher_cfg, settings['teacher_weights'],
                                   settings.get('allow_random_teacher', False))

        def step(b):
            with paddle.no_grad():
                teacher(b)
    else:
        d = setup.distillers[role]
        opt = setup.optimizer(d)
        step = lambda b: _train_step(d, opt, b)  # noqa: E731
    for batch in setup.batches:
        step(batch)
    peak = sampler.stop()
    out = {'rss_after_import_mb': baseline, 'rss_peak_mb': peak, 'above_import_mb': peak - baseline,
           'ru_maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if paddle.device.get_device().startswith('gpu'):
        out['gpu_max_allocated_mb'] = paddle.device.cuda.max_memory_allocated() / 2 ** 20
    print(_MEMORY_TAG + json.dumps(out), flush=True)


def measure_memory(argv: List[str], roles: List[str], log_dir: str) -> Dict[str, dict]:
    """Peak memory per role, each in a fresh ``tools/benchmark.py speed --memory_role`` subprocess."""
    from ppdistill.runs import RunFailed, run_tool
    out = {}
    for role in roles:
        log = os.path.join(log_dir, f'memory_{role}.log')
        try:
            run_tool(f'memory {role}', argv + ['--memory_role', role], log, os.getcwd(), '[bench]')
        except RunFailed as err:
            sys.stdout.write(err.log_tail)
            sys.exit(f'[bench] {err}')
        with open(log) as f:
            line = [ln for ln in f if ln.startswith(_MEMORY_TAG)][-1]
        out[role] = json.loads(line[len(_MEMORY_TAG):])
    return out


def memory_checks(memory: Dict[str, dict], methods) -> Dict[str, dict]:
    """Per method: distill peak against student peak + teacher peak (+10% allowed)."""
    key = 'gpu_max_allocated_mb' if 'gpu_max_allocated_mb' in memory['student'] else 'above_import_mb'
    budget = memory['student'][key] + memory['teacher'][key]
    return {m: {'metric': key, 'distill_mb': memory[m][key], 'student_plus_teacher_mb': budget,
                'ratio': memory[m][key] / budget, 'within_110pct': memory[m][key] <= 1.1 * budget}
            for m in methods}


def markdown(result: dict) -> str:
    lines = [f"# Speed benchmark: {result['arch']}", '', f"- date: {result['date']}",
             f"- command: `{result['command']}`", f"- device: {result['device']}, OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', '?')}; medians over {result['timing']['steps']} steps "
             f"after {result['warmup']} warm-up steps, all variants interleaved on the same batches"
             + (' (FEWER THAN 8 STEPS: a smoke run, not a measurement)'
                if result['timing']['steps'] < 8 else ''),
             '',
             'Ratios are of the medians; in brackets, the quartiles (25–75%) of the same ratio step by step '
             '(each step\'s variants ran back to back): the noise to read a ratio against.', '',
             '| method | student step ms | teacher fwd ms | limit ms | distill step ms | ratio (distill/limit) '
             '| loss fwd+bwd ms | overhead distill/(limit+loss) |', '|---|---|---|---|---|---|---|---|']

    def spread(q):
        return f' [{q[0]:.3f}–{q[2]:.3f}]' if q else ''
    for m, r in result['timing']['methods'].items():
        lines.append(f"| {m} | {r['student_ms']:.1f} | {r['teacher_ms']:.1f} | {r['limit_ms']:.1f} | "
                     f"{r['distill_ms']:.1f} | {r['ratio']:.3f}{spread(r.get('ratio_q'))} | {r['loss_ms']:.1f} | "
                     f"{r['overhead']:.3f}{spread(r.get('overhead_q'))} |")
    fast = {m: r for m, r in result['timing']['methods'].items() if 'fast_ratio' in r}
    if fast:
        lines += ['', '## Fast teacher path (teacher_mode: fast) against the same limit', '',
                  'limit = student step + today\'s (eager) teacher forward; target: fast ratio <= 0.90.', '',
                  '| method | teacher fwd eager ms | teacher fwd fast ms | distill step fast ms | '
                  'fast ratio (distill fast/limit) | <= 0.90 |', '|---|---|---|---|---|---|']
        lines += [f"| {m} | {r['teacher_ms']:.1f} | {r['teacher_fast_ms']:.1f} | {r['distill_fast_ms']:.1f} | "
                  f"{r['fast_ratio']:.3f}{spread(r['fast_ratio_q'])} | {'yes' if r['fast_ratio'] <= 0.90 else 'no'} |"
                  for m, r in fast.items()]
    fgd = [(m, f) for m, r in result['timing']['methods'].items() for f in r.get('fgd_forward', [])]
    if fgd:
        lines += ['', '## FGD loss forward, same tensors: ppdistill FGDLoss vs ppdet 2.6 FGDFeatureLoss', '',
                  '| term | ours ms | ppdet ms | speedup (ppdet/ours) |', '|---|---|---|---|']
        lines += [f"| {f['term']} | {f['ours_ms']:.2f} | {f['ppdet_ms']:.2f} | {f['speedup']:.2f}x |"
                  for _, f in fgd]
    elif any(k.startswith('fgd_ours[') for k in result.get('raw_seconds', {})):
        lines += ['', "ppdet's FGDFeatureLoss does not run on this paddle: no FGD forward comparison."]
    if result.get('memory'):
        mem = result['memory']
        gpu = 'gpu_max_allocated_mb' in mem['student']
        lines += ['', '## Peak memory (one subprocess each, the same batches)', '',
                  'RSS sampled every 2 ms; "above imports" = peak RSS minus the RSS once paddle/ppdet are '
                  'imported (model build, data and steps).', '',
                  '| run | peak RSS above imports MB | peak RSS MB |'
                  + (' GPU max allocated MB |' if gpu else ''),
                  '|---|---|---|' + ('---|' if gpu else '')]
        for role, v in mem.items():
            extra = f" {v['gpu_max_allocated_mb']:.0f} |" if gpu else ''
            lines.append(f"| {role} | {v['above_import_mb']:.0f} | {v['rss_peak_mb']:.0f} |{extra}")
        lines += ['', '| method | distill / (student + teacher) | within +10% |', '|---|---|---|']
        lines += [f"| {m} | {c['ratio']:.3f} | {'yes' if c['within_110pct'] else 'no'} |"
                  for m, c in result['memory_check'].items()]
    return '\n'.join(lines) + '\n'


def speed_benchmark(args, arch: str, methods: Dict[str, str], teacher_cfg: str, student_cfg: str,
                    out: str, command: str) -> dict:
    """``tools/benchmark.py speed``: timing in this process, memory in subprocesses; writes md + json
    (``command``: the invocation, for the report)."""
    from ppdistill.runs import now_utc

    if args.memory_role:
        return memory_role(args, methods, teacher_cfg, student_cfg)
    print(f"[bench] speed {arch}: methods {', '.join(methods)}; {args.warmup} warm-up + "
          f'{args.steps} timed steps, interleaved', flush=True)
    setup = BenchSetup(args, methods, teacher_cfg, student_cfg, build_student=False)
    times = measure_times(setup, args.warmup)
    timing = summarise(times, methods)
    result = {'date': now_utc(), 'command': command, 'arch': arch, 'device': paddle.device.get_device(),
              'warmup': args.warmup, 'timing': timing, 'raw_seconds': times}
    os.makedirs(out, exist_ok=True)
    if not args.no_memory:
        argv = [os.path.abspath(sys.argv[0])] + sys.argv[1:]
        memory = measure_memory(argv, ['student', 'teacher'] + list(methods),
                                os.path.join(out, f'speed_{arch}_logs'))
        result['memory'] = memory
        result['memory_check'] = memory_checks(memory, methods)
    write_report(out, f'speed_{arch}', markdown(result), result)
    return result
