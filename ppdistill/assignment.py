"""The student head's own label assignment, read once per training step for the losses that declare
:attr:`~ppdistill.losses.base.DistillLoss.assignment_keys` (dense-head KD: N_pos, LD's main region, the
assigned-score sum).

Where it comes from is the student preset row's ``assignment`` (:mod:`ppdistill.presets`), never the
architecture's name:

* ``taps``: assigner sublayers whose output is ``(labels [N, A], boxes [N, A, 4], scores [N, A, C], ...)``
  with ``A`` the locations of every level in head order and label ``C`` the background (ppdet's
  ``ATSSAssigner``/``TaskAlignedAssigner``). Exactly one of them fires per training step (PicoDet and
  PP-YOLOE run the static ATSS assigner before ``static_assigner_epoch``, the task-aligned one after),
  so they get a tap set of their own with no call-count probe: eval mode never runs an assigner;
* ``inputs``: batch keys written by the reader, ``{labels: <key>, [num_pos: <key>], [background: <label>]}``.
  ``labels`` is one ``[N, A]`` key (GFL's ``Gt2GFLTarget``: ``labels``, background ``C``) or a pattern
  ``<prefix>*`` for one key per level, ``<prefix>0, <prefix>1, ...`` in head order, each ``[N, H, W, 1]``
  (FCOS's ``Gt2FCOSTarget``: ``labels*``, background 0); ``num_pos`` the per-image positive counts
  (GFL: ``pos_num``), else the positives of ``labels`` are counted. ``background`` defaults to ``C``.

``num_pos`` is the batch's positive count over all levels; ``assigned_scores_sum`` (assigner taps only) the
sum of the assigner's scores, PP-YOLOE's and PicoDet's class-loss divisor. Both are averaged over ranks
in a multi-process run and clipped to ``>= 1`` (the papers' ``N_pos``, ppdet's ``reduce_mean``).
"""
import contextlib
import re
from typing import Dict, Iterator, List, Sequence, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .errors import PPDistillError
from .taps import TapSet

__all__ = ['Assignment', 'AssignmentError', 'level_masks', 'resize_mask']

_INPUT_KEYS = {'labels', 'num_pos', 'background'}


class AssignmentError(PPDistillError):
    """The student head's label assignment could not be read in a step."""


class Assignment:
    """Reads a student's label assignment as a preset row's ``assignment`` entry says (module docstring).

    Args:
        model: the student architecture.
        row: the preset row's ``assignment``: ``{'taps': [sublayer, ...]}`` or ``{'inputs': {'labels': key or
            '<prefix>*', ['num_pos': key], ['background': label]}}``.
    """

    def __init__(self, model: nn.Layer, row: dict):
        names = list(row.get('taps') or [])
        self.inputs = dict(row.get('inputs') or {})
        if bool(names) == bool(self.inputs) or (self.inputs and ('labels' not in self.inputs
                                                                 or set(self.inputs) - _INPUT_KEYS)):
            raise PPDistillError(f"a preset's assignment names assigner taps or the batch keys {{labels, [num_pos], "
                                 f'[background]}}, got {row!r}')
        self.taps = TapSet(model, names, role='student assignment') if names else None

    @property
    def keys(self) -> Tuple[str, ...]:
        """The assignment keys (:data:`~ppdistill.losses.base.ASSIGNMENT_KEYS`) this source gives: only an
        assigner's output carries the soft scores behind ``assigned_scores_sum``."""
        return ('pos', 'num_pos') + (('assigned_scores_sum',) if self.taps is not None else ())

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """Record the assigner taps inside the block (no-op for a reader-fed assignment)."""
        if self.taps is None:
            yield
            return
        with self.taps.record():
            yield

    def _from_taps(self) -> Tuple[paddle.Tensor, paddle.Tensor, int]:
        fired = {name: tap.calls for name, tap in self.taps.taps.items() if tap.calls}
        if len(fired) != 1 or len(next(iter(fired.values()))) != 1:
            counts = ', '.join(f'{n}: {len(t.calls)}' for n, t in self.taps.taps.items())
            why = 'none fired: assigners run only in a training forward' if not fired else 'ambiguous'
            raise AssignmentError(
                f"the student's label assignment must come from exactly one assigner call per step, got {counts} "
                f'call(s) ({why}); a loss that needs it (normalize: positives, LDLoss ld_weight/kd_weight) cannot '
                'run on this forward')
        out = next(iter(fired.values()))[0]
        if not isinstance(out, (list, tuple)) or len(out) < 3:
            raise AssignmentError(f'assigner {next(iter(fired))} returned {type(out).__name__}; expected '
                                  '(labels [N, A], boxes, scores [N, A, C], ...)')
        labels, scores = out[0], out[2]
        return labels, scores, int(scores.shape[-1])

    def _batch_labels(self, inputs: dict) -> paddle.Tensor:
        """The reader's labels as ``[N, A]``: one key, or the per-level keys of a ``<prefix>*`` pattern
        concatenated in level order."""
        spec = self.inputs['labels']
        if '*' in spec:
            pattern = re.compile(re.escape(spec).replace(r'\*', r'(\d+)') + '$')
            found = sorted((int(m.group(1)), k) for k in inputs for m in [pattern.match(str(k))] if m)
            keys = [k for _, k in found]
            if not keys or [i for i, _ in found] != list(range(len(keys))):
                raise AssignmentError(f"the batch has no per-level labels {spec} (0, 1, ...), got "
                                      f'{keys or sorted(map(str, inputs))}: the student reader must write the '
                                      f"head's label assignment ({self.inputs})")
        else:
            keys = [spec]
        missing = [k for k in keys + [self.inputs.get('num_pos')] if k is not None and k not in inputs]
        if missing:
            raise AssignmentError(f"the batch has no {missing}: the student reader must write the head's "
                                  f'label assignment ({self.inputs})')
        n = int(inputs[keys[0]].shape[0])
        return paddle.concat([paddle.reshape(inputs[k].detach(), [n, -1]) for k in keys], axis=1)

    def read(self, inputs: dict, num_classes: int) -> Dict[str, paddle.Tensor]:
        """This step's ``{'positive': [N, A] float32, 'num_pos': scalar, ['assigned_scores_sum': scalar]}``
        (scalars float32, ``>= 1``), detached.

        ``num_classes``: the background label of a reader-fed assignment without ``background`` (the
        student's class count); tapped assigners give it as their scores' last dimension."""
        found = {}
        try:
            if self.taps is not None:
                labels, scores, background = self._from_taps()
                found['assigned_scores_sum'] = paddle.cast(scores.detach(), 'float32').sum()
            else:
                labels = self._batch_labels(inputs)
                background = int(self.inputs.get('background', num_classes))
            labels = paddle.reshape(labels.detach(), [int(labels.shape[0]), -1])
            positive = paddle.cast(labels != background, 'float32')
            counts = inputs[self.inputs['num_pos']] if 'num_pos' in self.inputs else None
            if counts is None:
                found['num_pos'] = positive.sum()
            else:
                found['num_pos'] = (paddle.concat([paddle.reshape(paddle.cast(c, 'float32'), [-1]) for c in counts])
                                    if isinstance(counts, (list, tuple)) else paddle.cast(counts, 'float32')).sum()
        finally:
            if self.taps is not None:
                self.taps.clear()
        world = paddle.distributed.get_world_size()
        for key, value in found.items():
            if world > 1:
                value = value.clone()
                paddle.distributed.all_reduce(value)
                value = value / world
            found[key] = paddle.clip(value, min=1.0)
        return dict(found, positive=positive)

    def remove(self) -> None:
        if self.taps is not None:
            self.taps.remove()


def level_masks(positive: paddle.Tensor, shapes: Sequence[Sequence[int]]) -> List[paddle.Tensor]:
    """``positive`` ``[N, A]`` split into one ``[N, 1, H_j, W_j]`` map per level, ``shapes`` the levels'
    ``[N, C, H_j, W_j]`` in head order (``A = sum_j H_j*W_j``, each level row-major)."""
    sizes = [int(s[2]) * int(s[3]) for s in shapes]
    if sum(sizes) != int(positive.shape[1]):
        raise AssignmentError(f'the assignment has {int(positive.shape[1])} locations but the student levels '
                              f'{[list(s[2:]) for s in shapes]} have {sum(sizes)}: tap the class logits of every '
                              'head level, in head order')
    n = int(positive.shape[0])
    return [part.reshape([n, 1, int(s[2]), int(s[3])])
            for part, s in zip(paddle.split(positive, sizes, axis=1), shapes)]


def resize_mask(mask: paddle.Tensor, size: Sequence[int]) -> paddle.Tensor:
    """A ``[N, 1, H, W]`` mask at another ``H, W`` (nearest), as the student tensor it goes with."""
    return mask if list(mask.shape[-2:]) == list(size) else F.interpolate(mask, size=list(size), mode='nearest')
