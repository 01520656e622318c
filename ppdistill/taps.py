"""Taps: read intermediate tensors of a model through forward-post-hooks, by exact sublayer name.

A tap never edits the model: it registers a forward-post-hook on the sublayer whose name in
``model.named_sublayers()`` equals the requested name (names may contain dots, e.g.
``yolo_head.yolo_output.0``). Hooks record only while :meth:`TapSet.record` is active, so a tapped model
behaves exactly as before outside the distiller's forward and no tensor outlives a step.
A sublayer that runs several times per forward (a head conv shared across FPN levels) records one
entry per call. A tap *spec* may also be a pattern with ``*`` standing for one name component
(``head.head_cls_list.*``, ``yolo_head.yolo_output.*``): it expands to every matching sublayer, in
natural order (``.2`` before ``.10``), one level each — per-level head convs are distilled like a neck. How often each tap fires per forward is fixed at build time (:meth:`TapSet.expect`, from
the shape probe); every later forward is checked against it, so a changed count is an error naming the
tap, never a level silently cut or misindexed.

Two spec forms serve sublayers that do not return per-level maps (DETR transformers):

* ``name[i]`` records item ``i`` of the sublayer's tuple output (``transformer[1]``: DINOTransformer's decoder
  logits ``[L, N, Q, C]`` out of its ``(boxes, logits, enc_boxes, enc_logits, dn_meta)``);
* ``seq@levels`` lays a token sequence out as maps: ``seq`` returns ``[N, sum_l H_l*W_l, C]`` (tokens of
  every level, row-major, level after level) and ``levels`` is a spec whose levels ``[N, C_l, H_l, W_l]``
  give the sizes; each level is returned as ``[N, C, H_l, W_l]``
  (``transformer.encoder@transformer.input_proj.*``: a DINO encoder's memory at its input levels).
"""
import contextlib
import difflib
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn

from .errors import PPDistillError

__all__ = ['FeatureTap', 'TapSet', 'TapError', 'TapCountError', 'find_sublayer', 'expand_spec', 'split_item',
           'split_sequence', 'sequence_maps']


class TapError(PPDistillError):
    """A tap name or a tapped output that cannot be used."""


class TapCountError(TapError):
    """A tap fired a different number of times in a forward than in the build-time probe."""


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


_ITEM = re.compile(r'^(.+)\[(\d+)\]$')


def split_item(name: str) -> Tuple[str, Optional[int]]:
    """``'transformer[1]'`` -> ``('transformer', 1)``; a plain name -> ``(name, None)``."""
    m = _ITEM.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def split_sequence(spec: str) -> Tuple[str, Optional[str]]:
    """``'seq@levels'`` -> ``('seq', 'levels')``; any other spec -> ``(spec, None)``."""
    seq, _, levels = spec.partition('@')
    return (seq, levels) if levels else (spec, None)


def expand_spec(model: nn.Layer, spec: str) -> List[str]:
    """The tap names a spec stands for: ``[spec]`` for an exact name (or ``name[i]``), every sublayer whose
    name matches a pattern (``*`` = one dot-free name component), naturally sorted, and for ``seq@levels``
    the sequence's name followed by the levels'."""
    seq, levels = split_sequence(spec)
    if levels is not None:
        if '*' in seq or '@' in levels:
            raise TapError(f"tap spec '{spec}': the sequence before '@' must be one sublayer name and the "
                           'levels after it a name or pattern')
        return expand_spec(model, seq) + expand_spec(model, levels)
    base, item = split_item(spec)
    if item is not None:
        if '*' in base:
            raise TapError(f"tap spec '{spec}': an item [i] needs one sublayer name, not a pattern")
        find_sublayer(model, base)
        return [spec]
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


def sequence_maps(sequence: List[paddle.Tensor], sizes: Sequence[Tuple[int, int]],
                  spec: str = '') -> List[paddle.Tensor]:
    """One ``[N, sum_l H_l*W_l, C]`` token sequence (a one-item list, as a tap records it) -> a
    ``[N, C, H_l, W_l]`` map per ``(H_l, W_l)`` of ``sizes``: consecutive chunks of ``H_l*W_l`` tokens,
    row-major (as ``flatten(2).transpose([0, 2, 1])`` laid them out)."""
    if len(sequence) != 1 or sequence[0].ndim != 3:
        got = [list(t.shape) for t in sequence]
        raise TapError(f"tap spec '{spec}': the sequence must be one [N, tokens, C] tensor per forward, got {got}")
    tokens = [int(h) * int(w) for h, w in sizes]
    x = sequence[0]
    if sum(tokens) != int(x.shape[1]):
        raise TapError(f"tap spec '{spec}': the sequence has {int(x.shape[1])} tokens but its levels {list(sizes)} "
                       f'hold {sum(tokens)}: the levels must be the maps the sequence was flattened from')
    chunks = paddle.split(x, tokens, axis=1)
    return [c.transpose([0, 2, 1]).reshape([int(x.shape[0]), int(x.shape[2]), int(h), int(w)])
            for c, (h, w) in zip(chunks, sizes)]


class FeatureTap:
    """Records every output of one named sublayer (item ``i`` of it for a ``name[i]`` tap) while its owning
    :class:`TapSet` records."""

    def __init__(self, name: str, layer: nn.Layer, owner: 'TapSet'):
        self.name = name
        self.item = split_item(name)[1]
        self.calls: list = []
        self._owner = owner
        self.layer = layer
        self._handle = layer.register_forward_post_hook(self._hook)

    def _hook(self, layer, inputs, output):
        if self._owner.recording:
            if self.item is not None:
                if not isinstance(output, (list, tuple)) or len(output) <= self.item:
                    got = f'{len(output)} items' if isinstance(output, (list, tuple)) else type(output).__name__
                    raise TapError(f"tap '{self.name}' needs item {self.item} of the sublayer's tuple output, "
                                   f'but it returned {got}')
                output = output[self.item]
            self.calls.append(output)
            self._owner._after_call(self)

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

    ``role`` names the model in errors (``student``/``teacher``). After :meth:`expect` (the call counts of
    one full forward, from the build-time probe) every recording is checked: a tap firing more often fails
    at once, fewer times when the forward ends. ``record(stop_early=True)`` ends the forward as soon as
    every tap has fired its expected number of times, so whatever runs after the last tap (the teacher's
    head, loss and post-processing when only neck features are distilled) never runs.
    """

    def __init__(self, model: nn.Layer, specs: Sequence[str], role: str = ''):
        self.recording = False
        self.role = role or type(model).__name__
        self._stop_early = False
        self.expected: Optional[Dict[str, int]] = None
        self.specs: Dict[str, List[str]] = {spec: expand_spec(model, spec) for spec in dict.fromkeys(specs)}
        self.taps: Dict[str, FeatureTap] = {}
        for names in self.specs.values():
            for name in names:
                if name not in self.taps:
                    self.taps[name] = FeatureTap(name, find_sublayer(model, split_item(name)[0]), self)

    def expect(self, calls: Dict[str, int]) -> None:
        """Fix how many times each tap fires per forward (``{tap name: calls}``, every tap, each >= 1)."""
        missing = sorted(set(self.taps) - set(calls))
        if missing:
            raise TapError(f'{self.role}: no expected call count for tap(s) {missing}')
        self.expected = {n: int(calls[n]) for n in self.taps}

    def _count_error(self, name: str, got: str) -> TapCountError:
        return TapCountError(
            f"{self.role} tap '{name}' fired {got} time(s) in this forward but {self.expected[name]} "
            'time(s) in the build-time probe: its levels would be cut or misindexed (does the model run '
            'that sublayer a different number of times in training, or for this input size?)')

    def _after_call(self, tap: FeatureTap) -> None:
        if self.expected is None:
            return
        if len(tap.calls) > self.expected[tap.name]:
            raise self._count_error(tap.name, f'at least {len(tap.calls)}')
        if self._stop_early and all(len(t.calls) == self.expected[n] for n, t in self.taps.items()):
            raise _TapsComplete()

    def check_counts(self) -> None:
        """Raise :class:`TapCountError` unless every tap fired exactly its expected number of times."""
        if self.expected is None:
            return
        for name, tap in self.taps.items():
            if len(tap.calls) != self.expected[name]:
                raise self._count_error(name, str(len(tap.calls)))

    def clear(self) -> None:
        for tap in self.taps.values():
            tap.calls = []

    @contextlib.contextmanager
    def record(self, stop_early: bool = False) -> Iterator['TapSet']:
        """Record tap outputs inside the block (earlier records are cleared first); on a normal end (or
        an early stop) the call counts are checked against :meth:`expect`."""
        if stop_early and self.expected is None:
            raise TapError(f'{self.role}: stop_early needs the expected call counts (TapSet.expect)')
        self.clear()
        self.recording, self._stop_early = True, stop_early
        try:
            yield self
        except _TapsComplete:
            pass
        finally:
            self.recording, self._stop_early = False, False
        self.check_counts()

    @contextlib.contextmanager
    def replace(self, spec: str, levels: Dict[int, paddle.Tensor]) -> Iterator[None]:
        """Inside the block, the spec's sublayers return ``levels[i]`` instead of their own output on the
        call that gives level ``i`` (numbered as :meth:`levels` numbers them, from the expected call
        counts); a level missing from ``levels`` keeps the layer's own output. Whatever runs after the
        sublayer then runs on the given tensor, in the graph (CrossKD: a teacher's head on student
        features). The spec's own taps still record the layer's own outputs."""
        if self.expected is None:
            raise TapError(f'{self.role}: replace needs the expected call counts (TapSet.expect)')
        if split_sequence(spec)[1] is not None or split_item(spec)[1] is not None:
            raise TapError(f"{self.role}: '{spec}' cannot be replaced: only a sublayer's whole output can")
        first, start = {}, 0
        for name in self.specs[spec]:
            first[name], start = start, start + self.expected[name]
        calls = dict.fromkeys(first, 0)

        def hook_for(name):
            def hook(layer, inputs, output):
                if not isinstance(output, paddle.Tensor):
                    raise TapError(f"{self.role} sublayer '{name}' returns a {type(output).__name__}; only a "
                                   'sublayer returning one Tensor per call can be replaced')
                i = first[name] + calls[name]
                calls[name] += 1
                return levels.get(i)
            return hook
        handles = [self.taps[name].layer.register_forward_post_hook(hook_for(name)) for name in first]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def levels(self, spec: str) -> List[paddle.Tensor]:
        """A spec's recorded tensors, one per level (a pattern: its sublayers' levels, in order; ``seq@levels``:
        the sequence as maps of the levels' sizes, :func:`sequence_maps`)."""
        seq, levels = split_sequence(spec)
        if levels is not None:
            sizes = [t for name in self.specs[spec][1:] for t in self.taps[name].levels()]
            return sequence_maps(self.taps[seq].levels(), [tuple(t.shape[-2:]) for t in sizes], spec)
        return [t for name in self.specs[spec] for t in self.taps[name].levels()]

    def silent(self) -> List[str]:
        """Tapped sublayers that recorded nothing so far."""
        return [n for n, t in self.taps.items() if not t.calls]

    def remove(self) -> None:
        for tap in self.taps.values():
            tap.remove()
