"""bncore.inference (chapter 4's helpers) against torch's own modules and plain arithmetic."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bncore import experiments as ex
from bncore import inference as inf


def _trained_bn(bn, steps=5, shape=(16, 4), seed=0):
    """Run a few training batches through bn so its running statistics are not the defaults,
    and give it non-trivial gamma and beta."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            bn(torch.randn(shape, generator=gen) * 3 + 1)
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 2.0, generator=gen)
            bn.bias.normal_(generator=gen)
    return bn.eval()


def test_fold_bn_matches_torch_fusion_for_linear_and_conv():
    torch.manual_seed(0)
    linear, bn1 = nn.Linear(5, 4), _trained_bn(nn.BatchNorm1d(4))
    conv, bn2 = nn.Conv2d(3, 4, 3, padding=1), _trained_bn(nn.BatchNorm2d(4), shape=(8, 4, 5, 5))
    for layer, bn, fused in [(linear, bn1, fuse_linear_bn_eval(linear.eval(), bn1)),
                             (conv, bn2, fuse_conv_bn_eval(conv.eval(), bn2))]:
        ours = inf.fold_bn(layer, bn)
        torch.testing.assert_close(ours.weight, fused.weight)
        torch.testing.assert_close(ours.bias, fused.bias)


def test_fold_bn_handles_a_layer_without_bias():
    torch.manual_seed(1)
    linear, bn = nn.Linear(6, 3, bias=False), _trained_bn(nn.BatchNorm1d(3), shape=(10, 3))
    x = torch.randn(20, 6)
    with torch.no_grad():
        torch.testing.assert_close(inf.fold_bn(linear, bn)(x), bn(linear(x)))
    assert linear.bias is None  # the original is left as it was


def test_fold_model_removes_every_bn_and_keeps_the_function():
    torch.manual_seed(2)
    for model, x in [(ex.mlp([8, 16, 16, 3], bn="before"), torch.randn(32, 8)),
                     (ex.small_cnn(channels=(4, 8), bn="before"), torch.randn(32, 1, 8, 8))]:
        with torch.no_grad():
            for _ in range(3):
                model.train()(x)
        folded = inf.fold_model(model)
        assert not inf.batch_norm_layers(folded)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_fold_model_keeps_bn_that_follows_an_activation():
    model = ex.mlp([8, 16, 3], bn="after")
    assert len(inf.batch_norm_layers(inf.fold_model(model))) == 1


def test_predict_train_mode_leaves_the_model_untouched_and_covers_every_example():
    torch.manual_seed(3)
    model = ex.mlp([8, 16, 3], bn="before").eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(45, 8)  # 45 = 11 batches of 4 and a last batch of 1, merged into the 11th
    out = inf.predict_train_mode(model, x, batch_size=4)
    assert out.shape == (45, 3) and torch.isfinite(out).all()
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # one batch of everything is plain training mode on x
    with torch.no_grad():
        torch.testing.assert_close(inf.predict_train_mode(model, x, batch_size=45),
                                   copy.deepcopy(model).train()(x))


def test_precise_bn_with_one_batch_gives_the_population_statistics():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, momentum=0.3))
    x = torch.randn(200, 5) * 2 + 3
    inf.precise_bn(model, x)
    bn = model[1]
    with torch.no_grad():
        z = model[0](x)
    torch.testing.assert_close(bn.running_mean, z.mean(0))
    torch.testing.assert_close(bn.running_var, z.var(0, unbiased=True))
    assert bn.momentum == 0.3 and model.training


def test_precise_bn_in_batches_averages_the_batch_statistics():
    torch.manual_seed(5)
    model = nn.Sequential(nn.BatchNorm1d(3))
    x = torch.randn(40, 3)
    inf.precise_bn(model, x, batch_size=10, seed=7)
    batches = inf._batches(40, 10, torch.Generator().manual_seed(7))
    torch.testing.assert_close(model[0].running_mean,
                               torch.stack([x[i].mean(0) for i in batches]).mean(0))
    torch.testing.assert_close(model[0].running_var,
                               torch.stack([x[i].var(0) for i in batches]).mean(0))
    assert model[0].num_batches_tracked.item() == 4


@pytest.mark.parametrize("keras_momentum", [0.99, 0.9, 0.5])
def test_keras_momentum_equals_torch_one_minus_momentum(keras_momentum):
    torch.manual_seed(6)
    keras = inf.KerasMomentumBatchNorm1d(4, momentum=keras_momentum)
    torch_bn = nn.BatchNorm1d(4, momentum=1 - keras_momentum)
    for _ in range(10):
        x = torch.randn(8, 4) * 2 + 1
        torch.testing.assert_close(keras(x), torch_bn(x))
    torch.testing.assert_close(keras.running_mean, torch_bn.running_mean)
    torch.testing.assert_close(keras.running_var, torch_bn.running_var)
    assert keras.num_batches_tracked == torch_bn.num_batches_tracked


def test_mode_gap_is_zero_for_a_network_without_batch_norm():
    torch.manual_seed(7)
    model = ex.mlp([8, 16, 3], bn=None)
    x, y = torch.randn(30, 8), torch.randint(0, 3, (30,))
    result = inf.mode_gap(model, x, y, batch_size=5)
    assert result["gap"] == 0.0
    assert result["train_loss"] == pytest.approx(result["eval_loss"])


def test_helpers_work_with_bncore_torch_drop_ins():
    bnt = pytest.importorskip("bncore.torch")
    torch.manual_seed(8)
    model = ex.mlp([8, 16, 3], bn="before", bn_layer=bnt.BatchNorm1d)
    x = torch.randn(64, 8)
    inf.precise_bn(model, x)
    assert len(inf.batch_norm_layers(model)) == 1
    folded = inf.fold_model(model)
    assert not inf.batch_norm_layers(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(8, 4), (8, 4, 5)])
def test_keras_momentum_handles_n_c_and_n_c_l_input(shape):
    """Statistics over every axis but 1, as nn.BatchNorm1d: (N, C) and (N, C, L) alike."""
    torch.manual_seed(9)
    keras = inf.KerasMomentumBatchNorm1d(4, momentum=0.9)
    torch_bn = nn.BatchNorm1d(4, momentum=0.1)
    for _ in range(3):
        x = torch.randn(shape) * 2 + 1
        torch.testing.assert_close(keras(x), torch_bn(x))
    torch.testing.assert_close(keras.running_mean, torch_bn.running_mean)
    torch.testing.assert_close(keras.running_var, torch_bn.running_var)


def test_keras_momentum_without_running_statistics_uses_batch_statistics():
    torch.manual_seed(11)
    keras = inf.KerasMomentumBatchNorm1d(4, track_running_stats=False)
    torch_bn = nn.BatchNorm1d(4, track_running_stats=False)
    x = torch.randn(8, 4) * 2 + 1
    torch.testing.assert_close(keras(x), torch_bn(x))
    torch.testing.assert_close(keras.eval()(x), torch_bn.eval()(x))


def test_keras_momentum_rejects_momentum_none():
    with pytest.raises(ValueError, match="momentum"):
        inf.KerasMomentumBatchNorm1d(4, momentum=None)


def test_keras_momentum_rejects_a_wrong_shape_before_changing_state():
    keras = inf.KerasMomentumBatchNorm1d(4)
    with pytest.raises(ValueError, match="2D or 3D"):
        keras(torch.randn(8, 4, 2, 2))
    assert keras.num_batches_tracked == 0


@pytest.mark.parametrize("training", [True, False])
def test_time_forward_restores_the_mode(training):
    model = ex.mlp([8, 16, 3], bn="before").train(training)
    inf.time_forward(model, torch.randn(4, 8), repeats=2, warmup=1)
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    inf.time_forward_pair(model, copy.deepcopy(model), torch.randn(4, 8), repeats=2, rounds=1)
    assert all(m.training is training for m in model.modules())


def test_time_forward_restores_mixed_modes():
    model = ex.mlp([8, 16, 3], bn="before").train()
    model[1].eval()  # a frozen BN inside a training model
    inf.time_forward(model, torch.randn(4, 8), repeats=2, warmup=1)
    assert [m.training for m in model] == [True, False, True, True]


def test_fold_bn_rejects_a_training_mode_bn():
    linear, bn = nn.Linear(5, 4), _trained_bn(nn.BatchNorm1d(4)).train()
    with pytest.raises(ValueError, match="eval"):
        inf.fold_bn(linear, bn)


def test_fold_bn_rejects_a_bn_without_running_statistics():
    linear, bn = nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="running statistics"):
        inf.fold_bn(linear, bn)


def test_fold_bn_rejects_a_channel_count_that_does_not_match():
    linear, bn = nn.Linear(5, 3), _trained_bn(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"\(3, 5\).*num_features=4"):
        inf.fold_bn(linear, bn)


def test_fold_model_folds_the_eval_mode_bn_of_a_training_mode_model():
    """fold_model builds the inference model: it folds each BN as it acts in eval mode, whatever
    mode the model is in, and leaves the model's mode alone."""
    torch.manual_seed(10)
    model = ex.mlp([8, 16, 3], bn="before")
    x = torch.randn(32, 8)
    with torch.no_grad():
        model(x)
    folded = inf.fold_model(model)
    assert model.training and not folded.training
    with torch.no_grad():
        torch.testing.assert_close(folded(x), copy.deepcopy(model).eval()(x))
