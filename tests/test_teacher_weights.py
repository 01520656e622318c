"""Teacher checkpoints that do not fit the teacher config stop the build (a random classifier would
otherwise be distilled from)."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import logging
import os

import numpy as np
import paddle
import pytest

from ppdistill import DistillConfigError
from ppdistill.build import build_teacher
from ppdistill.config_scope import config_scope

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, 'configs', 'demo', 'picodet_teacher.yml')
WEIGHTS = os.path.join(ROOT, 'configs', 'demo', 'weights', 'picodet_teacher.pdparams')


@pytest.fixture
def shipped():
    with config_scope():
        yield {k: np.asarray(v) for k, v in paddle.load(WEIGHTS).items()}


def test_shipped_teacher_loads_with_aliases_counted_once(shipped):
    teacher, _ = build_teacher(TEACHER, WEIGHTS)
    own = teacher.state_dict()
    distinct = {id(v) for v in own.values()}
    assert len(distinct) < len(own)  # PicoHeadV2 registers each class conv under two names
    from ppdistill.build import load_checked_weights
    assert load_checked_weights(teacher, WEIGHTS) == (len(distinct), len(distinct))
    for k, v in shipped.items():
        np.testing.assert_array_equal(own[k].numpy(), v)


def test_teacher_checkpoint_with_another_class_count_is_an_error_naming_the_tensors(shipped, tmp_path):
    """The shipped teacher's class convs reshaped to 80 classes (a COCO head): 12 of 397 names, under the
    95% threshold that alone used to decide."""
    reshaped = {k: (np.zeros([80] + list(v.shape[1:]), v.dtype) if 'head_cls' in k else v)
                for k, v in shipped.items()}
    changed = sorted(k for k in shipped if 'head_cls' in k)
    assert changed and len(changed) < 0.05 * len(shipped)
    path = str(tmp_path / 'coco_head.pdparams')
    paddle.save({k: paddle.to_tensor(v) for k, v in reshaped.items()}, path)
    with pytest.raises(DistillConfigError) as err:
        build_teacher(TEACHER, path)
    message = str(err.value)
    assert 'coco_head.pdparams' in message and 'another shape' in message and '\n' not in message
    assert '[80, ' in message and 'head.head_cls' in message and 'num_classes' in message
    assert f'{len(changed) // 2}/' in message  # the class convs counted once, not per alias


def test_missing_tensors_within_the_threshold_are_named_in_a_warning(shipped, tmp_path, caplog):
    # both names of the level-0 box conv (an alias left in the file still loads the tensor)
    dropped = sorted(k for k in shipped if k.startswith(('head.head_reg_list.0.', 'head.head_reg0.')))
    assert len(dropped) == 4
    path = str(tmp_path / 'partial.pdparams')
    paddle.save({k: paddle.to_tensor(v) for k, v in shipped.items() if k not in dropped}, path)
    logger = logging.getLogger('ppdistill.build')
    logger.addHandler(caplog.handler)
    try:
        build_teacher(TEACHER, path)
    finally:
        logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f'{len(dropped) // 2}/' in warnings[0] and 'head_reg' in warnings[0]
