"""Taps: read intermediate tensors of a model through forward-post-hooks, by exact sublayer name.

A tap never edits the model: it registers a forward-post-hook on the sublayer whose name in
``model.named_sublayers()`` equals the requested name (names may contain dots, e.g.
``yolo_head.yolo_output.0``). Hooks record only while :meth:`TapSet.record` is active, so a tapped model
behaves exactly as before outside the distiller's forward and no tensor outlives a step.
A sublayer that runs several times per forward (a head conv shared across FPN levels) records one
entry per call. A tap *spec* may also be a pattern with ``*`` standing for one name component
(``head.head_cls_list.*``, ``yolo_head.yolo_output.*``): it expands to every matching sublayer, in
natural order (``.2`` before ``.10``), one level each — per-level head convs are distilled like a neck.
"""
import contextlib
import difflib
import re
from typing import Dict, Iterator, List, Optional, Sequence

import paddle
import paddle.nn as nn

from .errors import PPDistillError

__all__ = ['FeatureTap', 'TapSet', 'TapError', 'find_sublayer', 'expand_spec']


class TapError(PPDistillError):
    """A tap name or a tapped output that cannot be used."""


class _TapsComplete(Exception):
    """Raised from a hook to end a forward early once every tap has what it needs."""


def find_sublayer(model: nn.Layer, name: str) -> nn.Layer:
    """Return the sublayer called exactly ``name``; on a miss, list the closest real names."""
    layers = dict(model.named_sublayers())
    if name in layers:
        return layers[name]
    close = difflib.get_close_matches(name, list(layers), n=5, cutoff=0.5)
    hint = ', '.join(close) if close else ', '.join(sorted({k.split('.')[0] for k in layers}))
    raise TapError(f"no sublayer named '{name}' in {type(model).__name__}; closest names: {hint}")


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def expand_spec(model: nn.Layer, spec: str) -> List[str]:
    """The sublayer names a tap spec stands for: ``[spec]`` for an exact name, else every sublayer whose
    name matches the pattern (``*`` = one dot-free name component), naturally sorted."""
    if '*' not in spec:
        find_sublayer(model, spec)
        return [spec]
    pattern = re.compile('^' + '[^.]+'.join(re.escape(p) for p in spec.split('*')) + '$')
    names = sorted((n for n, _ in model.named_sublayers() if pattern.match(n)), key=_natural_key)
    if not names:
        find_sublayer(model, spec.replace('*', '0'))  # raises, listing the closest real names
    return names


def _as_levels(output, name: str) -> List[paddle.Tensor]:
    """A recorded output as a list of tensors: a tensor is one level, a list/tuple is one per item."""
    if isinstance(output, paddle.Tensor):
        return [output]
    if isinstance(output, (list, tuple)) and all(isinstance(o, paddle.Tensor) for o in output):
        return list(output)
    raise TapError(f"tap '{name}' recorded a {type(output).__name__}; only a Tensor or a list/tuple "
                   "of Tensors can be distilled — tap a sublayer that returns tensors")


class FeatureTap:
    """Records every output of one named sublayer while its owning :class:`TapSet` records."""

    def __init__(self, name: str, layer: nn.Layer, owner: 'TapSet'):
        self.name = name
        self.calls: list = []
        self._owner = owner
        self._handle = layer.register_forward_post_hook(self._hook)

    def _hook(self, layer, inputs, output):
        if self._owner.recording:
            self.calls.append(output)
            self._owner._after_call()

    def levels(self) -> List[paddle.Tensor]:
        """Recorded tensors, one per level: the items of a single list-valued call, else one per call."""
        if not self.calls:
            raise TapError(f"tap '{self.name}' recorded nothing: the sublayer did not run in forward")
        if len(self.calls) == 1:
            return _as_levels(self.calls[0], self.name)
        levels = []
        for out in self.calls:
            levels.extend(_as_levels(out, self.name))
        return levels

    def remove(self) -> None:
        self._handle.remove()


class TapSet:
    """Taps on several sublayers of one model.

    ``stop_early``: the first complete forward under ``record(stop_early=True)`` shows how often each tap
    fires; later ones end as soon as every tap has fired that often. The teacher's head
    and loss are skipped when only neck features are distilled.
    """

    def __init__(self, model: nn.Layer, specs: Sequence[str]):
        self.recording = False
        self._stop_early = False
        self._expected: Optional[Dict[str, int]] = None
        self.specs: Dict[str, List[str]] = {spec: expand_spec(model, spec) for spec in dict.fromkeys(specs)}
        self.taps: Dict[str, FeatureTap] = {}
        for names in self.specs.values():
            for name in names:
                if name not in self.taps:
                    self.taps[name] = FeatureTap(name, find_sublayer(model, name), self)

    def _after_call(self) -> None:
        if self._stop_early and self._expected is not None and all(
                len(t.calls) >= self._expected[n] for n, t in self.taps.items()):
            raise _TapsComplete()

    def clear(self) -> None:
        for tap in self.taps.values():
            tap.calls = []

    @contextlib.contextmanager
    def record(self, stop_early: bool = False) -> Iterator['TapSet']:
        """Record tap outputs inside the block (earlier records are cleared first)."""
        self.clear()
        self.recording, self._stop_early = True, stop_early
        completed = False
        try:
            yield self
            completed = True
        except _TapsComplete:
            completed = True
        finally:
            self.recording, self._stop_early = False, False
        if completed and stop_early and self._expected is None:
            self._expected = {n: len(t.calls) for n, t in self.taps.items()}

    def levels(self, spec: str) -> List[paddle.Tensor]:
        """A spec's recorded tensors, one per level (a pattern: its sublayers' levels, in order)."""
        return [t for name in self.specs[spec] for t in self.taps[name].levels()]

    def silent(self) -> List[str]:
        """Tapped sublayers that recorded nothing so far."""
        return [n for n, t in self.taps.items() if not t.calls]

    def remove(self) -> None:
        for tap in self.taps.values():
            tap.remove()
