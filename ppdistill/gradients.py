"""Gradients of a distiller's losses on the student's own parameters.

How hard a distill term pulls the student is the size of its gradient on the student's parameters, not its
value (a term can be 14x the detection loss in value and 0.17x in gradient, docs/results.md). Both users
measure it here, on the same parameters: ``weight: auto`` (:mod:`ppdistill.auto_weight`) scales a loss
entry to a chosen gradient share at the start of training, and ``tools/benchmark.py gradients``
(:mod:`ppdistill.bench.gradients`) reports every term's share, cosine and task step kept.

The parameters are the student's trainable ones: the distill modules (align convs, MGD generators, FGD
context blocks) are not the student and are left out, so the detection loss, which never reaches them, is
compared on the same set.
"""
from typing import List, Optional

import numpy as np
import paddle
import paddle.nn as nn

__all__ = ['student_parameters', 'flat_gradient', 'gradient_norm']


def student_parameters(distiller: nn.Layer) -> List[paddle.Tensor]:
    """The student's parameters that take gradient (``distiller.student_model``), in its order."""
    return [p for p in distiller.student_model.parameters() if not p.stop_gradient]


def _gradients(loss: paddle.Tensor, params: List[paddle.Tensor]) -> List[Optional[paddle.Tensor]]:
    """``d loss / d p`` for every ``p`` (None where ``loss`` does not reach it); the graph is kept, so the
    next loss of the same forward can be differentiated too. Nothing is accumulated into ``p.grad``."""
    return paddle.grad([loss], params, retain_graph=True, allow_unused=True)


def flat_gradient(loss: paddle.Tensor, params: List[paddle.Tensor]) -> np.ndarray:
    """The gradient of scalar ``loss`` on ``params`` as one float64 vector ``[sum of numel]`` (zeros where
    it does not reach a parameter)."""
    grads = _gradients(loss, params)
    return np.concatenate([np.zeros(int(np.prod(p.shape)), 'float64') if g is None
                           else g.numpy().astype('float64').ravel() for g, p in zip(grads, params)])


def gradient_norm(loss: paddle.Tensor, params: List[paddle.Tensor]) -> float:
    """``||d loss / d params||_2`` of scalar ``loss`` (0 when it reaches none of them; inf/NaN when the
    gradient is not finite). Summed in float64 on the device, one host read."""
    if loss.stop_gradient:  # a constant (e.g. a loss returning zeros): paddle.grad would refuse it
        return 0.0
    grads = [g for g in _gradients(loss, params) if g is not None]
    if not grads:
        return 0.0
    squares = paddle.add_n([paddle.sum(paddle.square(g.astype('float64'))) for g in grads])
    return float(np.sqrt(float(squares)))
