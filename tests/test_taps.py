import ppdistill  # noqa: F401  (import order: ppdet before paddle)
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from ppdistill.taps import TapCountError, TapError, TapSet
from toy_models import ToyDet, ToyHead, toy_inputs


def test_dotted_name_and_repeated_calls_record_per_call():
    model = ToyDet(levels=3)
    model.eval()
    taps = TapSet(model, ['head.convs.0', 'head.cls', 'neck'])
    inputs = toy_inputs()
    with taps.record():
        model(inputs)
    feats = model.neck(model.backbone(inputs['image']))
    # neck: one call returning a list -> one entry per level
    assert len(taps.levels('neck')) == 3
    for got, want in zip(taps.levels('neck'), feats):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
    # shared conv: one entry per call (per level), each equal to the conv applied to that level
    assert len(taps.taps['head.cls'].calls) == 3
    assert [tuple(t.shape) for t in taps.levels('head.convs.0')] == [tuple(f.shape) for f in feats]
    want_cls = model.head(feats)
    for got, want in zip(taps.levels('head.cls'), want_cls):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_nothing_recorded_outside_record_and_cleared_on_entry():
    model = ToyDet()
    taps = TapSet(model, ['neck'])
    model(toy_inputs())
    assert taps.taps['neck'].calls == []
    with taps.record():
        model(toy_inputs())
    assert len(taps.taps['neck'].calls) == 1
    model(toy_inputs())  # outside: no more records
    assert len(taps.taps['neck'].calls) == 1
    with taps.record():
        pass
    assert taps.taps['neck'].calls == []
    with pytest.raises(TapError, match='recorded nothing'):
        taps.levels('neck')


def test_unknown_name_fails_at_build_with_closest_names():
    model = ToyDet()
    with pytest.raises(TapError) as err:
        TapSet(model, ['head.conv.0'])
    assert 'head.convs.0' in str(err.value)


def test_stop_early_stops_from_the_first_forward_once_expected_counts_are_reached():
    model = ToyDet()
    taps = TapSet(model, ['neck'])
    head_calls = []
    model.head.cls.register_forward_post_hook(lambda layer, i, o: head_calls.append(1))
    with pytest.raises(TapError, match='stop_early needs the expected call counts'):
        with taps.record(stop_early=True):
            pass
    taps.expect({'neck': 1})
    with taps.record(stop_early=True):
        model(toy_inputs())
    assert head_calls == []  # the head never ran, not even on the first forward
    assert len(taps.levels('neck')) == 2
    with taps.record():  # without stop_early the model runs fully
        out = model(toy_inputs())
    assert 'loss' in out and len(head_calls) == 2


class ExtraCallHead(ToyHead):
    """Calls the shared ``cls`` conv once more than there are levels while ``extra`` is set."""

    extra = False

    def forward(self, feats):
        outs = super().forward(feats)
        return outs + [self.cls(F.relu(self.convs[0](feats[-1])))] if self.extra else outs


def extra_call_model():
    model = ToyDet(levels=2)
    model.head = ExtraCallHead(8)
    return model


@pytest.mark.parametrize('stop_early', [False, True])
def test_a_changed_call_count_is_an_error_naming_the_tap_and_both_counts(stop_early):
    model = extra_call_model()
    taps = TapSet(model, ['head.cls', 'neck'], role='student')
    taps.expect({'head.cls': 2, 'neck': 1})
    with taps.record(stop_early=stop_early):
        model(toy_inputs())
    assert len(taps.levels('head.cls')) == 2
    model.head.extra = True
    if stop_early:  # the forward ends once every count is reached: the extra call never happens
        with taps.record(stop_early=True):
            model(toy_inputs())
        assert len(taps.levels('head.cls')) == 2
    else:  # more calls: fails as soon as the third call happens
        with pytest.raises(TapCountError, match=r"student tap 'head.cls' fired at least 3 time\(s\) in this "
                                                r"forward but 2 time\(s\) in the build-time probe"):
            with taps.record():
                model(toy_inputs())
    model.head.extra = False
    taps.expect({'head.cls': 3, 'neck': 1})  # fewer calls than expected: fails when the forward ends
    with pytest.raises(TapCountError, match=r"student tap 'head.cls' fired 2 time\(s\) in this forward "
                                            r"but 3 time\(s\)"):
        with taps.record(stop_early=stop_early):
            model(toy_inputs())


def test_non_tensor_output_is_a_clear_error():
    class DictOut(paddle.nn.Layer):
        def forward(self, x):
            return {'p3': x}

    class Wrapper(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.neck = DictOut()

        def forward(self, x):
            return self.neck(x)

    model = Wrapper()
    taps = TapSet(model, ['neck'])
    with taps.record():
        model(paddle.ones([1, 2, 4, 4]))
    with pytest.raises(TapError, match='only a Tensor or a list/tuple'):
        taps.levels('neck')


def test_pattern_spec_expands_to_numbered_sublayers_in_natural_order():
    model = ToyDet(levels=12)  # neck.lateral.0 .. neck.lateral.11: '10' must sort after '9', not after '1'
    model.eval()
    taps = TapSet(model, ['neck.lateral.*', 'neck'])
    assert taps.specs['neck.lateral.*'] == [f'neck.lateral.{i}' for i in range(12)]
    with taps.record():
        model(toy_inputs(size=64))
    got = taps.levels('neck.lateral.*')
    want = taps.levels('neck')  # the neck returns exactly its lateral convs' outputs, in level order
    assert len(got) == 12
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w.numpy())


def test_pattern_spec_without_match_lists_close_names():
    with pytest.raises(TapError, match="neck.lateral.0"):
        TapSet(ToyDet(), ['neck.laterl.*'])


def test_replace_gives_later_layers_the_given_tensor_on_the_call_of_that_level():
    """A shared layer (ToyHead.convs.0 runs once per level): level 1's call returns the given tensor, level 0
    keeps its own output, and what runs after it (relu, cls) runs on the replacement, in the graph."""
    model = ToyDet(width=8, neck_ch=4, levels=2, dropout=0.0)
    model.eval()
    taps = TapSet(model, ['head.convs.0', 'head.cls'])
    taps.expect({'head.convs.0': 2, 'head.cls': 2})
    inputs = toy_inputs()
    with taps.record():
        model(inputs)
    own = taps.levels('head.cls')
    new = paddle.full(taps.levels('head.convs.0')[1].shape, 0.5)
    new.stop_gradient = False
    with taps.record(), taps.replace('head.convs.0', {1: new}):
        model(inputs)
    crossed = taps.levels('head.cls')
    np.testing.assert_allclose(crossed[0].numpy(), own[0].numpy(), rtol=1e-6)
    expected = model.head.cls(F.relu(new))
    np.testing.assert_allclose(crossed[1].numpy(), expected.numpy(), rtol=1e-6)
    crossed[1].sum().backward()
    assert new.grad is not None and float(new.grad.abs().sum()) > 0
    with taps.record():  # the hook is gone after the block
        model(inputs)
    np.testing.assert_allclose(taps.levels('head.cls')[1].numpy(), own[1].numpy(), rtol=1e-6)


def test_item_spec_records_one_item_of_a_tuple_output():
    model = ToyDet(levels=3)
    model.eval()
    taps = TapSet(model, ['neck[1]', 'neck', 'head.cls[0]'])
    assert taps.specs['neck[1]'] == ['neck[1]'] and taps.taps['neck[1]'].layer is model.neck
    with pytest.raises(TapError, match=r"tap 'head.cls\[0\]' needs item 0 of the sublayer's tuple output, but it "
                                        'returned Tensor'):
        with taps.record():
            model(toy_inputs())
    taps = TapSet(model, ['neck[1]', 'neck'])
    with taps.record():
        model(toy_inputs())
    got, = taps.levels('neck[1]')
    np.testing.assert_array_equal(got.numpy(), taps.levels('neck')[1].numpy())
    with pytest.raises(TapError, match=r"needs one sublayer name"):
        TapSet(model, ['neck.lateral.*[0]'])
    with pytest.raises(TapError, match='closest names'):
        TapSet(model, ['nek[0]'])


def test_sequence_spec_and_its_errors():
    class Flat(paddle.nn.Layer):  # the neck's levels as one [N, tokens, C] sequence
        def forward(self, feats):
            return paddle.concat([f.flatten(2).transpose([0, 2, 1]) for f in feats], 1)

    model = ToyDet(levels=3)
    model.add_sublayer('flat', Flat())
    model.eval()
    taps = TapSet(model, ['flat@neck', 'neck'])
    assert taps.specs['flat@neck'] == ['flat', 'neck']
    taps.expect({'flat': 1, 'neck': 1})
    feats = model.neck(model.backbone(toy_inputs()['image']))
    with taps.record():
        model.flat(model.neck(model.backbone(toy_inputs()['image'])))
    for got, want in zip(taps.levels('flat@neck'), feats):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
    with pytest.raises(TapError, match='only a sublayer'):
        with taps.replace('flat@neck', {}):
            pass
    short = TapSet(model, ['flat@neck.lateral.0'])
    with short.record():
        model.flat(model.neck(model.backbone(toy_inputs()['image'])))
    with pytest.raises(TapError, match='the levels must be the maps the sequence was flattened from'):
        short.levels('flat@neck.lateral.0')
