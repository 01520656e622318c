"""Building from configs: teacher isolation, LCPAN guard, weight checks, distill-config validation."""
import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import os

import numpy as np
import paddle
import pytest
import yaml

from ppdet.core.workspace import create, global_config, load_config, merge_config
from ppdistill import DistillConfigError
from ppdistill.build import build_distiller, build_teacher, load_distill_config
from ppdistill.config_scope import config_scope, create_fresh
from ppdistill.pairing import probe_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, 'configs', 'demo', 'picodet_teacher.yml')


def picodet_yaml(path, channels, levels=4, extra=None):
    strides = [8, 16, 32, 64][:levels]
    cfg = {'_BASE_': [BASE],
           'LCPAN': {'out_channels': channels, 'num_features': levels},
           'PicoHeadV2': {'conv_feat': {'name': 'PicoFeat', 'feat_in': channels, 'feat_out': channels,
                                        'num_convs': 1, 'num_fpn_stride': levels, 'norm_type': 'bn',
                                        'share_cls_reg': True, 'use_se': True},
                          'fpn_stride': strides, 'feat_in_chan': channels}}
    cfg.update(extra or {})
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def scope():
    with config_scope():
        yield


@pytest.fixture
def pair(tmp_path, scope):
    student = picodet_yaml(tmp_path / 'student.yml', 32, extra={
        'epoch': 3, 'LCNet': {'scale': 0.35, 'feature_maps': [3, 4, 5]}, 'TrainReader': {'batch_size': 3}})
    teacher = picodet_yaml(tmp_path / 'teacher.yml', 64, extra={'epoch': 99, 'TrainReader': {'batch_size': 7}})
    return student, teacher


def watched():
    keys = ('LCNet', 'LCPAN', 'PicoHeadV2', 'TrainReader', 'epoch', 'filename', 'weights')
    return yaml.safe_dump({k: _plain(global_config[k]) for k in keys if k in global_config})


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(type(value))


def test_teacher_yaml_never_touches_the_student_config(pair):
    student, teacher = pair
    load_config(student)
    merge_config({'LearningRate': {'base_lr': 0.0123}})  # an -o override
    before, lr = watched(), global_config['LearningRate']['base_lr']
    model, arch = build_teacher(teacher, None, allow_random=True)
    assert watched() == before and global_config['LearningRate']['base_lr'] == lr
    assert arch == 'PicoDet' and model.neck.out_channels == 64  # built from the teacher's own YAML
    assert global_config['LCPAN']['out_channels'] == 32


def test_three_picodets_with_four_levels_build_and_run(pair):
    load_config(pair[0])
    models = [create_fresh('PicoDet') for _ in range(3)] + [create('PicoDet')]
    for model in models:
        assert len(model.neck.spatial_scales) == 4
        model.eval()
        # at the config's eval_size: PicoHeadV2 precomputes its anchors for it
        out = model(probe_inputs(int(global_config['eval_size'][0])))
        assert int(out['bbox_num'].sum()) >= 0


def distill_yaml(path, **cfg):
    cfg.setdefault('slim', 'MGDDistillModel')
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_teacher_weights_are_checked_by_name_and_shape(pair, tmp_path):
    student, teacher = pair
    load_config(student)
    t, _ = build_teacher(teacher, None, allow_random=True)
    paddle.save(t.state_dict(), str(tmp_path / 'teacher.pdparams'))
    s = create_fresh('PicoDet')
    paddle.save(s.state_dict(), str(tmp_path / 'student.pdparams'))

    loaded, _ = build_teacher(teacher, str(tmp_path / 'teacher'))  # suffix optional, like ppdet
    for k, v in t.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k].numpy(), v.numpy())
    with pytest.raises(DistillConfigError) as err:
        build_teacher(teacher, str(tmp_path / 'student.pdparams'))
    total = len(t.state_dict())
    matched = sum(1 for k, v in s.state_dict().items()
                  if k in t.state_dict() and v.shape == t.state_dict()[k].shape)
    assert f'match only {matched}/{total} teacher tensors' in str(err.value)
    assert 'student.pdparams' in str(err.value)
    with pytest.raises(DistillConfigError, match='weights file not found: .*absent.pdparams'):
        build_teacher(teacher, str(tmp_path / 'absent'))
    with pytest.raises(DistillConfigError, match='teacher_weights is not set'):
        build_teacher(teacher, None)


def test_distill_config_merges_only_distill_keys(pair, tmp_path):
    student, teacher = pair
    load_config(student)
    before = watched()
    path = distill_yaml(tmp_path / 'mgd.yml', teacher_config=os.path.basename(teacher),
                        allow_random_teacher=True, MGDDistillModel={'lambda_mgd': 0.5, 'probe_size': 128})
    load_distill_config(path)
    assert global_config['teacher_config'] == teacher  # resolved relative to the distill file
    assert global_config['filename'] == 'mgd'  # outputs go to output/mgd/
    after = yaml.safe_load(watched())
    after['filename'] = yaml.safe_load(before)['filename']
    assert after == yaml.safe_load(before)
    d = build_distiller(global_config)
    assert type(d).__name__ == 'MGDDistillModel'
    assert [t.key for t in d._terms] == [f'distill_mgd_l{i}' for i in range(4)]
    assert all(loss.lambda_mgd == 0.5 and loss.align is not None for loss in d.distill_losses)


@pytest.mark.parametrize('cfg, match', [
    ({'slim': 'DistillModel'}, "is not a ppdistill distiller"),
    ({'teacher_weights': 'x'}, 'teacher_config is missing'),
    ({'teacher_config': 'teacher.yml'}, 'teacher_weights is missing'),
    ({'teacher_config': 'teacher.yml', 'teacher_weights': 'x', 'epoch': 5}, r"keys \['epoch'\] do not belong"),
    ({'teacher_config': 'nope.yml', 'teacher_weights': 'x'}, "teacher_config 'nope.yml' not found"),
    ({'slim': 'Distill', 'slim_method': 'CWD'}, "slim_method='CWD' is not translated"),
])
def test_bad_distill_configs_are_rejected(pair, tmp_path, cfg, match):
    with pytest.raises(DistillConfigError, match=match):
        load_distill_config(distill_yaml(tmp_path / 'bad.yml', **cfg))


def test_upstream_fgd_format_is_translated_without_leaking_the_teacher(pair, tmp_path):
    student, teacher = pair
    load_config(student)
    before = watched()
    upstream = tmp_path / 'fgd_upstream.yml'
    upstream.write_text(yaml.safe_dump({
        '_BASE_': [teacher], 'pretrain_weights': 'teacher_w', 'slim': 'Distill', 'slim_method': 'FGD',
        'distill_loss': 'FGDFeatureLoss',
        'FGDFeatureLoss': {'student_channels': 32, 'teacher_channels': 64, 'temp': 0.7, 'alpha_fgd': 0.002}}))
    load_distill_config(str(upstream))
    assert global_config['slim'] == 'FocalGlobalDistillModel'
    assert global_config['teacher_config'] == str(upstream)
    assert global_config['teacher_weights'] == 'teacher_w'
    assert dict(global_config['FocalGlobalDistillModel']) == {'temp': 0.7, 'alpha_fgd': 0.002}
    after = yaml.safe_load(watched())
    after['filename'] = yaml.safe_load(before)['filename']
    assert after == yaml.safe_load(before)
