"""Shared checks of the output (logit) distillation losses.

Output losses compare a teacher's and a student's head outputs element by element, so the two must have
the same layout: there is no align conv for logits. A mismatch (another number of classes, anchors or
priors per cell) is a :class:`~ppdistill.errors.PPDistillError` at build time; the distiller adds the
loss entry and both tensor shapes to the message.
"""
from typing import Dict, Sequence, Union

import paddle

from ..errors import PPDistillError

__all__ = ['same_output_channels', 'split_anchors']

Channels = Union[int, Dict[str, int]]


def same_output_channels(loss: str, student: Channels, teacher: Channels,
                         names: Sequence[str] = ()) -> Channels:
    """Check that student and teacher outputs have equal channels; return them.

    ``names``: for a multi-tensor loss, the ``{name: C}`` keys it needs (both sides must be mappings
    holding them, e.g. ``student: {conf: cls_logits, loc: box_reg}``).
    """
    if names:
        for side, channels in (('student', student), ('teacher', teacher)):
            if not isinstance(channels, dict) or not set(names) <= set(channels):
                raise PPDistillError(f'{loss} needs {side}: {{{", ".join(f"{n}: <tap>" for n in names)}}} '
                                     f'(a mapping naming one tap per tensor), got channels {channels!r}')
        differ = [n for n in names if int(student[n]) != int(teacher[n])]
        if differ:
            raise PPDistillError(f'{loss}: ' + '; '.join(
                f'{n}: student {student[n]} channels vs teacher {teacher[n]}' for n in differ)
                + ' — output losses need identical head layouts (classes, anchors/priors per cell); '
                'logits get no align conv')
        return {n: int(student[n]) for n in names}
    if isinstance(student, dict) or isinstance(teacher, dict):
        raise PPDistillError(f'{loss} takes one tap per side (student: <role or sublayer>), got a mapping')
    if int(student) != int(teacher):
        raise PPDistillError(f'{loss}: student {student} channels vs teacher {teacher} — output losses need '
                             'identical head layouts (classes, anchors per cell); logits get no align conv')
    return int(student)


def split_anchors(x: paddle.Tensor, num_anchors: int) -> paddle.Tensor:
    """``[N, A*K, H, W]`` head output -> ``[N, A, K, H, W]`` (ppdet heads are anchor-major: channel
    ``a*K + k`` is anchor ``a``'s ``k``-th value)."""
    n, c, h, w = x.shape
    return x.reshape([n, num_anchors, c // num_anchors, h, w])
