"""The frozen teacher run as an inference model (``teacher_mode: fast`` in the distill config).

A distiller's teacher is frozen and always in eval mode, so up to its last tap it is an inference model.
:class:`FastTeacher` serves :meth:`Distiller.teacher_features <ppdistill.distiller.Distiller.
teacher_features>` from a Paddle Inference predictor of the *truncated* teacher:

1. truncation: a private copy of the teacher (without the distiller's hooks) is traced once with
   ``paddle.jit.to_static`` while its own taps record with ``stop_early``: tracing stops at the last tap,
   so the program holds exactly the operators the eager path runs, and returns the tapped tensors. The
   input is the image alone, ``[N, 3, H, W]`` with ``N``, ``H``, ``W`` dynamic: one program serves every
   batch size and every input size of multi-scale training;
2. the program is handed to Paddle Inference (``paddle.inference``) in memory. Its analysis passes fold
   every BatchNorm into the convolution before it (``conv_bn_fuse_pass``, ``conv_eltwiseadd_bn_fuse_pass``:
   weights ``W * gamma / sqrt(var + eps)`` per output channel, bias ``(b - mean) * gamma / sqrt(var + eps)
   + beta``, Ioffe & Szegedy 2015, the inference transform) and, on CPU with oneDNN, fuse conv + bias +
   activation into one oneDNN primitive; no autograd bookkeeping exists at all. (Folding in the training
   path instead, ``paddle.jit.to_static`` of the eager teacher, measured no faster on CPU: dygraph and
   dy2static run the same kernels, and a folded bias becomes a broadcast add that Paddle's CPU kernel runs
   slower than the batch_norm it replaces.)
3. each call copies the image in and the tap tensors out as float32 ``paddle.Tensor`` s, grouped per tap
   spec as the eager path returns them.

Threads: the predictor runs with the eager kernels' thread count (``OMP_NUM_THREADS``, which ppdistill's
tools set). A predictor run leaves the process's OpenMP thread count (Intel OpenMP, which Paddle's MKL
kernels use) at 1 whatever its config says, and every eager kernel after it, the student's training step
included, then ran on one thread: on the 2-core demo RetinaNet pair the eager teacher forward went from
~90 to ~160 ms. Each call therefore sets the count back (:func:`eager_threads`).

Nothing of it is a sublayer of the distiller: it is not in ``parameters()``, ``state_dict()``, the
checkpoints or the EMA; the teacher itself is not changed. At build time (:func:`attach_teacher_path`) the
predictor's taps are compared with the eager teacher's on random images of several sizes and batch sizes;
a failure anywhere (a teacher whose forward up to its taps needs more than the image, an operator Paddle
Inference lacks) or a difference above the tolerance keeps the eager path, and ONE log line says which path
runs and why.

On GPU, ``teacher_dtype: float16 | bfloat16`` builds the predictor with that ``precision_mode``
(``Config.enable_use_gpu``): Paddle Inference's mixed-precision pass converts the program's weights and
kernels except its black list (norms, softmax, reductions) and keeps the input and output tensors float32
(``enable_low_precision_io`` is off by default), so the losses still receive float32 features. It is
compared at build time with the reduced precision's own tolerance (:data:`REDUCED_RTOL`).
"""
import copy
import os
import tempfile
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn
from ppdet.utils.logger import setup_logger

from .errors import PPDistillError
from .taps import TapSet, split_sequence

logger = setup_logger(__name__)

__all__ = ['TEACHER_MODES', 'TEACHER_DTYPES', 'RTOL', 'ATOL', 'FastTeacher', 'FastTeacherError',
           'attach_teacher_path', 'build_fast_teacher', 'check_teacher_mode', 'tap_difference', 'try_fast_teacher']

TEACHER_MODES = ('eager', 'fast')
TEACHER_DTYPES = ('float32', 'float16', 'bfloat16')
# oneDNN's convolutions accumulate in another order than Paddle's native kernels, and the folded weights
# round once instead of per element: tap tensors move by ~1e-6 of their largest magnitude. Compared as
# |fast - eager| <= ATOL * max|eager| + RTOL * |eager| per element, per tap level.
RTOL, ATOL = 1e-5, 2e-5
REDUCED_RTOL = {'float16': 1e-2, 'bfloat16': 5e-2}
# (batch, side) of the build-time comparison: several sizes and batch sizes exercise the dynamic shapes.
CHECK_SHAPES = ((2, 96), (1, 160), (3, 224))


class FastTeacherError(PPDistillError):
    """The fast teacher path cannot serve this teacher (caught: the distiller keeps the eager path)."""


def check_teacher_mode(mode: str, dtype: str = 'float32') -> None:
    """A one-line :class:`~ppdistill.distiller.DistillConfigError` for a bad ``teacher_mode`` /
    ``teacher_dtype`` (called before anything is built)."""
    from .distiller import DistillConfigError
    if mode not in TEACHER_MODES:
        raise DistillConfigError(f'teacher_mode: {mode!r} is not one of {list(TEACHER_MODES)}')
    if dtype not in TEACHER_DTYPES:
        raise DistillConfigError(f'teacher_dtype: {dtype!r} is not one of {list(TEACHER_DTYPES)}')
    if dtype != 'float32' and (mode != 'fast' or not paddle.device.get_device().startswith('gpu')):
        raise DistillConfigError(f'teacher_dtype: {dtype} needs teacher_mode: fast on a GPU (the device is '
                                 f'{paddle.device.get_device()}); remove teacher_dtype or set it to float32')


def _copy_without_hooks(model: nn.Layer) -> nn.Layer:
    """A deep copy of ``model`` whose layers carry none of the original's hooks (the taps stay with it)."""
    memo = {}
    for layer in model.sublayers(include_self=True):
        for hooks in (layer._forward_pre_hooks, layer._forward_post_hooks):
            memo[id(hooks)] = OrderedDict()
    return copy.deepcopy(model, memo)


def _flat(outputs) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


class _Truncated(nn.Layer):
    """``image [N, 3, H, W] -> [tap tensor, ...]`` (every spec's levels in order): the teacher run until
    its last tap has fired. Traced by ``to_static`` with its Python run as is (``not_to_static``): the taps'
    early stop ends the trace, so nothing after the last tap enters the program."""

    def __init__(self, model: nn.Layer, taps: TapSet):
        super().__init__()
        self.model = model
        self.taps = taps

    def forward(self, image):
        return self._run(image)

    @paddle.jit.not_to_static
    def _run(self, image):
        try:
            with self.taps.record(stop_early=True):
                self.model({'image': image})
            # FeatureTap.levels' order (in a static trace the outputs are Variables, not paddle.Tensor)
            per_spec = {spec: [out for name in names for call in self.taps.taps[name].calls for out in _flat(call)]
                        for spec, names in self.taps.specs.items()}
            self.levels = {spec: len(outs) for spec, outs in per_spec.items()}  # to regroup the flat outputs
            return [out for outs in per_spec.values() for out in outs]
        finally:
            self.taps.clear()


def eager_threads() -> int:
    """The OpenMP/MKL thread count of Paddle's eager CPU kernels: ``OMP_NUM_THREADS`` (Paddle sets it to 1
    when it is unset)."""
    try:
        return max(1, int(os.environ.get('OMP_NUM_THREADS') or 1))
    except ValueError:
        return 1


def _set_threads(count: int) -> None:
    set_num_threads = getattr(paddle.base.core, 'set_num_threads', None)  # OpenMP and MKL, process-wide
    if set_num_threads is not None:
        set_num_threads(count)


def _predictor(program_dir: str, dtype: str):
    """A Paddle Inference predictor of the saved program: oneDNN on CPU, ``dtype`` precision on GPU."""
    import paddle.inference as pi
    # paddle.jit.save writes the program as teacher.pdmodel, or under paddle 3's PIR as teacher.json
    program = next((os.path.join(program_dir, f'teacher{ext}') for ext in ('.pdmodel', '.json')
                    if os.path.exists(os.path.join(program_dir, f'teacher{ext}'))),
                   os.path.join(program_dir, 'teacher.pdmodel'))
    config = pi.Config(program, os.path.join(program_dir, 'teacher.pdiparams'))
    device = paddle.device.get_device()
    if device.startswith('gpu'):
        precision = {'float32': pi.PrecisionType.Float32, 'float16': pi.PrecisionType.Half,
                     'bfloat16': pi.PrecisionType.Bfloat16}[dtype]
        config.enable_use_gpu(256, int(device.split(':')[1]) if ':' in device else 0, precision)
    else:
        config.disable_gpu()
        if program.endswith('.pdmodel'):
            config.enable_mkldnn()
            config.set_mkldnn_cache_capacity(16)  # oneDNN primitives per input shape: multi-scale, bounded
        else:  # paddle 3.3's oneDNN PIR executor rejects some conv attributes (on by default there)
            config.disable_mkldnn()
        config.set_cpu_math_library_num_threads(eager_threads())  # as many as the eager teacher had
    config.switch_ir_optim(True)
    config.disable_glog_info()
    if program.endswith('.pdmodel'):  # paddle 3's PIR pipeline has no memory_optimize_pass to enable
        config.enable_memory_optim()
    return pi.create_predictor(config)


class FastTeacher:
    """The teacher's tapped tensors from a Paddle Inference predictor of the truncated teacher (see the
    module docstring).

    A plain object, not a ``Layer``: set on a distiller it adds nothing to its sublayers, parameters or
    state dict. Call with a batch dict (only ``image`` is read): ``{tap spec: [float32 tensor per level]}``,
    as ``Distiller.teacher_features`` returns.
    """

    def __init__(self, teacher: nn.Layer, taps: TapSet, dtype: str = 'float32'):
        model = _copy_without_hooks(teacher)
        model.eval()
        own = TapSet(model, list(taps.specs), role=taps.role)
        own.expect(taps.expected)
        self.dtype = dtype
        truncated = _Truncated(model, own)
        truncated.eval()
        spec = [paddle.static.InputSpec([None, 3, None, None], 'float32', 'image')]
        with tempfile.TemporaryDirectory() as tmp:
            paddle.jit.save(truncated, os.path.join(tmp, 'teacher'), input_spec=spec)
            self._predictor = _predictor(tmp, dtype)  # reads the files now: the directory can go
        self._outputs = self._predictor.get_output_names()
        self._levels = truncated.levels
        self._threads = eager_threads()
        _set_threads(self._threads)

    def describe(self) -> str:
        device = paddle.device.get_device()
        how = f'GPU, {self.dtype}' if device.startswith('gpu') else 'CPU, oneDNN'
        return f'Paddle Inference on the teacher truncated at its last tap ({how}; BatchNorms folded)'

    def __call__(self, inputs: dict) -> Dict[str, List[paddle.Tensor]]:
        image = inputs['image']
        handle = self._predictor.get_input_handle('image')
        handle.copy_from_cpu(np.ascontiguousarray(image.numpy(), dtype='float32'))
        self._predictor.run()
        _set_threads(self._threads)  # the run left the process at one thread (module docstring)
        flat = [paddle.to_tensor(self._predictor.get_output_handle(name).copy_to_cpu(), dtype='float32',
                                 place=image.place) for name in self._outputs]
        out, start = {}, 0
        for spec in self._levels:
            out[spec] = flat[start:start + self._levels[spec]]
            start += self._levels[spec]
        return out


def tap_difference(fast: Dict[str, List[paddle.Tensor]], eager: Dict[str, List[paddle.Tensor]]) -> float:
    """Largest ``|fast - eager| / (ATOL * max|eager| + RTOL * |eager|)`` over every tap spec and level
    (<= 1: equal within the tolerance; inf for a missing level or another shape)."""
    worst = 0.0
    for spec, levels in eager.items():
        if len(fast.get(spec, [])) != len(levels):
            return float('inf')
        for f, e in zip(fast[spec], levels):
            e, f = e.numpy().astype('float64'), f.numpy().astype('float64')
            if e.shape != f.shape:
                return float('inf')
            bound = ATOL * np.abs(e).max() + RTOL * np.abs(e) + 1e-30
            worst = max(worst, float((np.abs(f - e) / bound).max()))
    return worst


def _unservable(distiller) -> Optional[str]:
    """Why the fast path cannot stand in for ``distiller``'s teacher forward, or None."""
    from .distiller import Distiller
    if type(distiller).teacher_features is not Distiller.teacher_features:
        return f'{type(distiller).__name__} overrides teacher_features'
    crossed = distiller.crossed_terms()
    if crossed:  # the crossed pass runs the eager teacher anyway; its targets come from the same path
        return f'distill term(s) {crossed} run the teacher model again (cross, or a loss with replacements)'
    sequences = [spec for spec in distiller.teacher_taps.specs if split_sequence(spec)[1] is not None]
    if sequences:  # the program returns the recorded tensors; laying a sequence out as maps is not in it
        return f'the teacher taps {sequences} are token sequences laid out as maps (seq@levels)'
    uses = [key for key, loss in distiller.term_losses().items() if getattr(loss, 'uses_teacher_model', False)]
    if uses:
        return f'distill term(s) {uses} run the teacher model themselves (uses_teacher_model)'
    own = set(map(id, distiller.teacher_taps.taps.values()))
    foreign = [name or 'the model' for name, layer in distiller.teacher_model.named_sublayers(include_self=True)
               for hooks in (layer._forward_pre_hooks, layer._forward_post_hooks)
               for hook in hooks.values() if id(getattr(hook, '__self__', None)) not in own]
    if foreign:
        return f'the teacher has forward hooks other than its taps (on {foreign[:3]})'
    return None


def build_fast_teacher(distiller, dtype: str = 'float32') -> FastTeacher:
    """A :class:`FastTeacher` for ``distiller`` whose taps equal its eager ones on random images of
    :data:`CHECK_SHAPES` within the tolerance; else :class:`FastTeacherError` saying why."""
    why = _unservable(distiller)
    if why:
        raise FastTeacherError(why)
    fast = FastTeacher(distiller.teacher_model, distiller.teacher_taps, dtype)
    scale = REDUCED_RTOL.get(dtype, RTOL) / RTOL
    for batch, side in CHECK_SHAPES:
        image = paddle.uniform([batch, 3, side, side], min=-2.0, max=2.0, seed=side)
        inputs = {'image': image, 'im_shape': paddle.to_tensor([[side, side]] * batch, dtype='float32'),
                  'scale_factor': paddle.ones([batch, 2])}
        worst = tap_difference(fast(inputs), distiller.eager_teacher_features(inputs))
        if not worst <= scale:
            raise FastTeacherError(f'its taps differ from the eager teacher\'s on a {batch}x3x{side}x{side} '
                                   f'input by {worst:.3g}x the tolerance (rtol {RTOL * scale:g}, atol {ATOL:g} '
                                   'of the largest value)')
    return fast


def _reason(err: Exception) -> str:
    """One line for a failure: paddle's dy2static errors end with the original ``Type: message`` line after
    the traced source; others are ``Type: message``."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if type(err).__module__.startswith('paddle.jit') and lines:
        return lines[-1][:300]
    return f"{type(err).__name__}: {' '.join(lines)[:300]}"


def try_fast_teacher(distiller, dtype: str = 'float32') -> Tuple[Optional[FastTeacher], str]:
    """``(FastTeacher, '')`` from :func:`build_fast_teacher`, or ``(None, one-line reason)`` on any failure."""
    try:
        return build_fast_teacher(distiller, dtype), ''
    except Exception as err:  # noqa: BLE001 - any failure of the fast path means: keep the eager one
        return None, _reason(err)


def attach_teacher_path(distiller, mode: str = 'eager', dtype: str = 'float32') -> str:
    """Set ``distiller.fast_teacher`` for ``teacher_mode`` (``eager``: None) and log ONE line naming the
    path that runs (and, when ``fast`` falls back to eager, why). Returns the line."""
    check_teacher_mode(mode, dtype)
    distiller.fast_teacher = None
    if mode == 'eager':
        line = 'teacher path: eager (teacher_mode: eager)'
    else:
        distiller.fast_teacher, why = try_fast_teacher(distiller, dtype)
        line = (f'teacher path: fast ({distiller.fast_teacher.describe()})' if distiller.fast_teacher is not None
                else f'teacher path: eager (teacher_mode: fast fell back: {why})')
    logger.info(line)
    return line
