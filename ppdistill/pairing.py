"""Build-time shape probing and student↔teacher level pairing (docs/design.md, principle 7).

Both models run once, in eval mode and without gradient, on a blank ``probe_size``² image; the taps give
every level's shape (a failure after the last tap fired, e.g. in post-processing, is ignored) and how
often each tap fires per forward, which fixes the taps' expected call counts for every later step
(:meth:`~ppdistill.taps.TapSet.expect`). Levels pair
by stride (``probe_size / H`` rounded to a power of two), so a 5-level teacher and a 4-level student share
the strides they both have. Channel mismatches are left to the loss's
1×1 align conv; a remaining H/W difference at run time resizes the student to the teacher.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn

from .errors import PPDistillError
from .taps import TapSet

__all__ = ['probe_shapes', 'pair_levels', 'LevelPair', 'PairingError']

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


def _stride_key(shape: Shape, size: int) -> Optional[int]:
    if len(shape) != 4 or shape[2] < 1:
        return None
    return int(round(math.log2(size / shape[2])))


def pair_levels(student: Sequence[Shape], teacher: Sequence[Shape], size: int,
                levels: Optional[Sequence[int]] = None, what: str = '') -> List[LevelPair]:
    """Pair student levels with the teacher level of the same stride.

    ``levels``: student level indices to distill (default: every level that has a teacher match).
    Raises :class:`PairingError` naming both shapes when nothing (or a requested level) can be paired.
    """
    for side, shapes in (('student', student), ('teacher', teacher)):
        bad = [s for s in shapes if len(s) != 4]
        if bad:
            raise PairingError(f"{what}: {side} tensors must be [N, C, H, W] feature maps, got {bad}")
    by_stride = {}
    for j, shape in enumerate(teacher):
        by_stride.setdefault(_stride_key(shape, size), j)
    wanted = list(range(len(student))) if levels is None else list(levels)
    pairs = []
    for i in wanted:
        if not 0 <= i < len(student):
            raise PairingError(f"{what}: student level {i} does not exist (student has {len(student)} "
                               f"levels: {list(student)})")
        j = by_stride.get(_stride_key(student[i], size))
        if j is None:
            if levels is not None:
                raise PairingError(f"{what}: student level {i} {student[i]} has no teacher level of the "
                                   f"same stride; teacher levels: {list(teacher)}")
            continue
        pairs.append(LevelPair(i, j, tuple(student[i]), tuple(teacher[j])))
    if not pairs:
        raise PairingError(f"{what}: no student level shares a stride with a teacher level; student "
                           f"{list(student)} vs teacher {list(teacher)} at probe size {size}")
    return pairs
