"""Build-time shape probing and student↔teacher level pairing (docs/design.md, principle 7).

Both models run once, in eval mode and without gradient, on a blank ``probe_size``² image; the taps give
every level's shape (a failure after the last tap fired, e.g. in post-processing, is ignored) and how
often each tap fires per forward, which fixes the taps' expected call counts for every later step
(:meth:`~ppdistill.taps.TapSet.expect`). Levels pair by their actual stride, the power of two ``s`` with
``ceil(probe_size / s) == H`` (stride-2 convs, as ppdet's backbones and extra blocks), else
``floor(probe_size / s) == H`` (pooling) (:func:`~ppdistill.masks.level_stride`), so a 5-level teacher and a
4-level student share the strides they both have, and SSD's 3x3 and 2x2 extra levels (strides 128 and
256 at 300 px) stay apart. Two levels of one model with the same stride at the probe size cannot be
paired unambiguously: that is a build error. Channel mismatches are left to the loss's
1×1 align conv; a remaining H/W difference at run time resizes the student to the teacher.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn
from ppdet.utils.logger import setup_logger

from .errors import PPDistillError
from .masks import level_stride
from .taps import TapSet

logger = setup_logger(__name__)

__all__ = ['probe_shapes', 'pair_levels', 'level_strides', 'LevelPair', 'PairingError']

Shape = Tuple[int, ...]


class PairingError(PPDistillError):
    """Student and teacher tensors that cannot be aligned."""


@dataclass(frozen=True)
class LevelPair:
    student_level: int
    teacher_level: int
    student_shape: Shape
    teacher_shape: Shape

    @property
    def student_channels(self) -> int:
        return int(self.student_shape[1])

    @property
    def teacher_channels(self) -> int:
        return int(self.teacher_shape[1])


def probe_inputs(size: int) -> dict:
    """The inputs ppdet architectures need in eval mode, for one blank ``size``² image."""
    return {
        'image': paddle.zeros([1, 3, size, size], dtype='float32'),
        'im_shape': paddle.to_tensor([[size, size]], dtype='float32'),
        'scale_factor': paddle.ones([1, 2], dtype='float32'),
    }


def probe_shapes(model: nn.Layer, taps: TapSet, size: int) -> Dict[str, List[Shape]]:
    """Per tap, the shape of every recorded level for one ``size``² image (BN statistics untouched).

    Also sets ``taps.expect(...)`` to the number of times each tap fired in this eval-mode forward.
    """
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad(), taps.record():
            try:
                model(probe_inputs(size))
            except Exception as err:  # noqa: BLE001
                # Post-processing tied to a fixed eval size (e.g. PicoHeadV2's precomputed anchors) may
                # reject the probe image after every tap has fired; only the taps matter here.
                silent = taps.silent()
                if silent:
                    raise PairingError(f'{type(model).__name__} failed on a {size}x{size} probe image before '
                                       f'tap(s) {silent} fired (set probe_size): {err}') from None
        taps.expect({name: len(t.calls) for name, t in taps.taps.items()})
        return {name: [tuple(int(d) for d in t.shape) for t in taps.levels(name)] for name in taps.specs}
    finally:
        taps.clear()
        model.train() if was_training else model.eval()


def level_strides(shapes: Sequence[Shape], size: int, what: str = '', side: str = '') -> List[Tuple[float, float]]:
    """``(stride_h, stride_w)`` of every ``[N, C, H, W]`` level at probe size ``size``; raises
    :class:`PairingError` when two levels share one (they could not be told apart)."""
    strides = [(level_stride(size, s[2]), level_stride(size, s[3])) for s in shapes]
    seen: Dict[Tuple[float, float], int] = {}
    for j, stride in enumerate(strides):
        if stride in seen:
            i = seen[stride]
            raise PairingError(f"{what}: {side} levels {i} {tuple(shapes[i])} and {j} {tuple(shapes[j])} have "
                               f"the same stride {stride[0]:g} at probe size {size}, so levels cannot be paired "
                               "by stride; set a larger probe_size in the distiller's section")
        seen[stride] = j
    return strides


def pair_levels(student: Sequence[Shape], teacher: Sequence[Shape], size: int,
                levels: Optional[Sequence[int]] = None, what: str = '') -> List[LevelPair]:
    """Pair student levels with the teacher level of the same stride.

    ``levels``: student level indices to distill (default: every level that has a teacher match; the
    others are named in a warning). Raises :class:`PairingError` naming both shapes when nothing (or a
    requested level) can be paired.
    """
    for side, shapes in (('student', student), ('teacher', teacher)):
        bad = [s for s in shapes if len(s) != 4]
        if bad:
            raise PairingError(f"{what}: {side} tensors must be [N, C, H, W] feature maps, got {bad}")
    by_stride = {stride: j for j, stride in enumerate(level_strides(teacher, size, what, 'teacher'))}
    student_strides = level_strides(student, size, what, 'student')
    wanted = list(range(len(student))) if levels is None else list(levels)
    pairs, unpaired = [], []
    for i in wanted:
        if not 0 <= i < len(student):
            raise PairingError(f"{what}: student level {i} does not exist (student has {len(student)} "
                               f"levels: {list(student)})")
        j = by_stride.get(student_strides[i])
        if j is None:
            if levels is not None:
                raise PairingError(f"{what}: student level {i} {student[i]} has no teacher level of the "
                                   f"same stride; teacher levels: {list(teacher)}")
            unpaired.append(i)
            continue
        pairs.append(LevelPair(i, j, tuple(student[i]), tuple(teacher[j])))
    if not pairs:
        raise PairingError(f"{what}: no student level shares a stride with a teacher level; student "
                           f"{list(student)} vs teacher {list(teacher)} at probe size {size}")
    if unpaired:
        logger.warning(f"{what}: student level(s) {unpaired} {[tuple(student[i]) for i in unpaired]} have no "
                       f"teacher level of the same stride (teacher {list(teacher)}) and are NOT distilled; "
                       f"set levels: {[p.student_level for p in pairs]} to say so")
    return pairs
