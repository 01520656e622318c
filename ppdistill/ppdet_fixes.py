"""Fixes of ppdet code that cannot run on the supported Paddle versions, applied on ``import ppdistill``.

Each fix is scoped to one ppdet module, changes nothing where that code already runs, and is applied only
when the failure it fixes is present on this stack (:func:`apply`).

* ``ppdet.modeling.transformers.dino_transformer`` (ppdet 2.6.0's DINO): ``DINOTransformer._get_encoder_input``
  builds each level's spatial shape as ``paddle.concat([h, w])`` of the two 0-D tensors that unpacking
  ``paddle.shape(feat)`` gives since Paddle 2.5, and ``paddle.concat`` rejects 0-D tensors, so every DINO
  forward raises ``The axis is expected to be in range of [0, 0)``. That module gets a ``paddle`` whose
  ``concat`` stacks a list of 0-D tensors (the one case ``paddle.concat`` rejects, where stacking is what
  the code means: a ``[2]`` shape) and is Paddle itself for everything else.
"""
from typing import Optional, Sequence

import paddle

__all__ = ['PaddleWithScalarConcat', 'apply']


class PaddleWithScalarConcat:
    """The ``paddle`` module, except that ``concat`` of 0-D tensors stacks them into a 1-D tensor."""

    def __init__(self, module=paddle):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def concat(self, x: Sequence[paddle.Tensor], axis: int = 0, name: Optional[str] = None) -> paddle.Tensor:
        if isinstance(x, (list, tuple)) and x and all(isinstance(t, paddle.Tensor) and t.ndim == 0 for t in x):
            return self._module.stack(list(x), axis=axis)
        return self._module.concat(x, axis=axis, name=name)


def _concat_rejects_0d() -> bool:
    try:
        paddle.concat([paddle.to_tensor(1), paddle.to_tensor(2)])
    except (ValueError, RuntimeError):
        return True
    return False


def apply() -> None:
    """Apply every fix whose failure this stack has (idempotent)."""
    try:
        from ppdet.modeling.transformers import dino_transformer
    except ImportError:  # a PaddleDetection without DINO
        return
    if not isinstance(dino_transformer.paddle, PaddleWithScalarConcat) and _concat_rejects_0d():
        dino_transformer.paddle = PaddleWithScalarConcat(dino_transformer.paddle)
