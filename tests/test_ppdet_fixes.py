"""ppdistill.ppdet_fixes: ppdet 2.6.0's DINO fails on Paddle >= 2.5 without the fix and runs with it; the fix
changes nothing but the failing case."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import inspect

import numpy as np
import paddle
import pytest

from conftest import needs_ppdet_heads_on_this_paddle

from ppdet.modeling.transformers import dino_transformer
from ppdistill.build import build_teacher
from ppdistill.pairing import probe_inputs
from ppdistill.ppdet_fixes import PaddleWithScalarConcat, _concat_rejects_0d, apply


def test_scalar_concat_stacks_0d_tensors_and_is_paddle_otherwise():
    fixed = PaddleWithScalarConcat()
    got = fixed.concat([paddle.to_tensor(3), paddle.to_tensor(5)])
    assert list(got.shape) == [2] and got.numpy().tolist() == [3, 5]
    a, b = paddle.rand([2, 3]), paddle.rand([1, 3])
    np.testing.assert_array_equal(fixed.concat([a, b]).numpy(), paddle.concat([a, b]).numpy())
    np.testing.assert_array_equal(fixed.concat([a, a], axis=1).numpy(), paddle.concat([a, a], axis=1).numpy())
    assert fixed.nn is paddle.nn and fixed.shape is paddle.shape


@needs_ppdet_heads_on_this_paddle
@pytest.mark.skipif(not _concat_rejects_0d(), reason='this Paddle concatenates 0-D tensors: nothing to fix')
@pytest.mark.skipif('paddle.concat([h, w])' not in inspect.getsource(dino_transformer),
                    reason="this ppdet's DINO does not concatenate 0-D shape tensors (fixed in PaddleDetection "
                           'develop): nothing to fix')
def test_dino_forward_fails_without_the_fix_and_runs_with_it(monkeypatch):
    assert isinstance(dino_transformer.paddle, PaddleWithScalarConcat)  # applied on import ppdistill
    model, _ = build_teacher('configs/demo/tiny/dino_student.yml', None, allow_random=True)
    monkeypatch.setattr(dino_transformer, 'paddle', paddle)  # ppdet's own code
    with pytest.raises(ValueError, match='axis is expected to be in range'):
        model(probe_inputs(128))
    apply()
    out = model(probe_inputs(128))
    assert list(out['bbox'].shape) == [30, 6]
    apply()  # idempotent: not wrapped twice
    assert dino_transformer.paddle._module is paddle
