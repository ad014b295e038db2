"""Chapter 2's helpers: bncore.tracking (NumPy) and the probes in bncore.experiments (torch)."""

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn

from bncore import tracking
from bncore.data import digits
from bncore.experiments import (
    NoisyBatchNorm1d,
    gaussian_init_,
    gradient_predictiveness,
    layer_input_gradients,
    layer_inputs,
    mlp,
    steps_to,
)


def torch_twin(net: tracking.SigmoidMLP) -> nn.Sequential:
    """The same net in torch, with the NumPy net's parameters (float64)."""
    model = mlp(list(net.sizes), "sigmoid", bn="before" if net.bn else None).double()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    norms = [m for m in model if isinstance(m, nn.BatchNorm1d)]
    with torch.no_grad():
        for layer, W, b in zip(linears, net.W, net.b, strict=True):
            layer.weight.copy_(torch.from_numpy(W.T))
            layer.bias.copy_(torch.from_numpy(b))
        for norm, g, bt in zip(norms, net.gamma, net.beta, strict=True):
            norm.weight.copy_(torch.from_numpy(g))
            norm.bias.copy_(torch.from_numpy(bt))
    return model


@pytest.mark.parametrize("bn", [False, True])
def test_sigmoid_mlp_step_matches_torch(bn):
    rng = np.random.default_rng(0)
    net = tracking.SigmoidMLP((12, 9, 7, 5), bn=bn, seed=1)
    X, y = rng.normal(size=(16, 12)), rng.integers(0, 5, 16)
    model = torch_twin(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    loss = nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y))
    loss.backward()
    opt.step()
    assert net.train_step(X, y, lr=0.3) == pytest.approx(loss.item(), rel=1e-12)
    after = torch_twin(net)
    for ours, theirs in zip(after.parameters(), model.parameters(), strict=True):
        np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), rtol=1e-10,
                                   atol=1e-12)
    if bn:  # running statistics as torch keeps them (unbiased variance, momentum 0.1)
        norms = [m for m in model if isinstance(m, nn.BatchNorm1d)]
        for norm, mean, var in zip(norms, net.running_mean, net.running_var, strict=True):
            np.testing.assert_allclose(mean, norm.running_mean.numpy(), rtol=1e-12)
            np.testing.assert_allclose(var, norm.running_var.numpy(), rtol=1e-12)
        model.eval()
        X_test = rng.normal(size=(5, 12))
        np.testing.assert_allclose(net.forward(X_test, train=False),
                                   model(torch.from_numpy(X_test)).detach().numpy(), rtol=1e-10)


def test_forward_changes_nothing():
    net = tracking.SigmoidMLP((6, 5, 4, 3), bn=True)
    X = np.random.default_rng(0).normal(size=(10, 6))
    net.train_step(X, np.arange(10) % 3, lr=0.1)
    before = [a.copy() for a in net.W + net.gamma + net.running_mean + net.running_var]
    net.forward(X * 3 + 1)
    after = net.W + net.gamma + net.running_mean + net.running_var
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_percentiles_match_torch_quantile():
    z = np.random.default_rng(2).normal(size=(37, 5))
    expected = torch.quantile(torch.from_numpy(z), torch.tensor([0.15, 0.5, 0.85],
                                                                dtype=torch.float64), dim=0)
    np.testing.assert_allclose(tracking.percentiles(z), expected.numpy(), rtol=1e-12)


def test_drift_is_wasserstein_over_earlier_std():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(50, 4)), rng.gamma(2.0, size=(50, 4))
    expected = [wasserstein_distance(a[:, j], b[:, j]) / (a[:, j].std() + 1e-8)
                for j in range(4)]
    np.testing.assert_allclose(tracking.drift(a, b), expected, rtol=1e-10)


def test_drift_of_a_shift_is_the_shift_in_std_units_and_ignores_order():
    rng = np.random.default_rng(4)
    a = rng.normal(2.0, 3.0, size=(40, 3))
    shifted = a + np.array([1.0, -2.0, 0.0])
    np.testing.assert_allclose(tracking.drift(a, shifted), np.abs([1.0, -2.0, 0.0]) / a.std(0))
    np.testing.assert_allclose(tracking.drift(a, rng.permutation(shifted)),
                               tracking.drift(a, shifted))
    with pytest.raises(ValueError):
        tracking.drift(a, a[:-1])


def test_saturation_threshold_is_log_49():
    edge = np.log(49.0)
    z = np.array([edge - 1e-6, edge + 1e-6, -edge - 1e-6, 0.0])
    assert tracking.saturation_fraction(z) == pytest.approx(0.5)


def test_tracker_history_stacks_per_layer_percentiles():
    rng = np.random.default_rng(5)
    tracker = tracking.ActivationTracker(q=(10, 90))
    snapshots = [[rng.normal(size=(20, 3)), rng.normal(size=(20, 2))] for _ in range(4)]
    for step, snap in zip((0, 5, 10, 15), snapshots, strict=True):
        tracker.record(step, snap)
    steps, P = tracker.history(1)
    np.testing.assert_array_equal(steps, [0, 5, 10, 15])
    assert P.shape == (4, 2, 2)
    np.testing.assert_allclose(P[2], np.percentile(snapshots[2][1], (10, 90), axis=0))


def test_track_training_records_what_it_says():
    split = digits()
    net = tracking.SigmoidMLP(bn=True, seed=3)
    twin = tracking.SigmoidMLP(bn=True, seed=3)
    out = tracking.track_training(net, split, steps=20, every=10, seed=2)
    np.testing.assert_array_equal(out["step"], [0, 10, 20])
    assert out["drift"].shape == (2, 3)
    assert out["test_acc"][0] == tracking.accuracy(twin, split.X_test, split.y_test)
    twin.forward(split.X_test)
    z0 = [z.copy() for z in twin.z]
    tracking.train(twin, split.X_train, split.y_train, 10, seed=2)
    twin.forward(split.X_test)
    np.testing.assert_allclose(out["drift"][0],
                               [tracking.drift(a, b).mean() for a, b in zip(z0, twin.z,
                                                                              strict=True)])


def sigmoid_net(bn):
    torch.manual_seed(0)
    return gaussian_init_(mlp([8, 6, 5, 3], "sigmoid", bn=bn))


def test_layer_inputs_match_a_manual_forward_and_leave_the_net_alone():
    net = sigmoid_net("before")
    X = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng_state = torch.get_rng_state()
    z = layer_inputs(net, X)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        h = X
        for layer in range(2):
            a = net[3 * layer](h)
            a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)
            np.testing.assert_allclose(z[layer], a.double().numpy(), rtol=1e-5, atol=1e-6)
            h = torch.sigmoid(a)


def test_layer_input_gradients_match_autograd_with_retain_grad():
    net = sigmoid_net(None)
    X, y = torch.randn(10, 8), torch.arange(10) % 3
    _, grads = layer_input_gradients(net, X, y)
    a1 = net[0](X)
    a1.retain_grad()
    a2 = net[2](net[1](a1))
    a2.retain_grad()
    nn.functional.cross_entropy(net[4](net[3](a2)), y).backward()
    np.testing.assert_allclose(grads[0], a1.grad.double().numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(grads[1], a2.grad.double().numpy(), rtol=1e-5, atol=1e-9)


def test_noisy_batch_norm_is_plain_in_eval_and_shifts_in_training():
    noisy, plain = NoisyBatchNorm1d(4, shift=1.0, scale=2.0), nn.BatchNorm1d(4)
    x = torch.randn(30, 4) * 3 + 1
    out, ref = noisy(x), plain(x)
    scale, shift = out.std(0) / ref.std(0), out.mean(0)
    assert torch.all((scale >= 0.5 - 1e-4) & (scale <= 2 + 1e-4))
    assert torch.all(shift.abs() <= 1 + 1e-5) and shift.abs().max() > 1e-3
    noisy.eval()
    plain.eval()
    torch.testing.assert_close(noisy(x), plain(x))


def test_gradient_predictiveness_of_a_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    X, y = torch.randn(20, 5, dtype=torch.float32), torch.arange(20) % 3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = gradient_predictiveness(model, X, y, [0.1, 1.0])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    W.requires_grad_(True)
    b.requires_grad_(True)

    def loss(W, b):
        return nn.functional.cross_entropy(X @ W.T + b, y)

    gW, gb = torch.autograd.grad(loss(W, b), (W, b))
    g = torch.cat([gW.reshape(-1), gb])
    for k, eta in enumerate([0.1, 1.0]):
        W1, b1 = (W - eta * gW).detach().requires_grad_(), (b - eta * gb).detach().requires_grad_()
        l1 = loss(W1, b1)
        g1 = torch.cat([t.reshape(-1) for t in torch.autograd.grad(l1, (W1, b1))])
        assert out["loss"][k] == pytest.approx(l1.item(), rel=1e-5)
        assert out["grad_change"][k] == pytest.approx((g1 - g).norm().item(), rel=1e-4)
    assert out["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-5)
    assert out["beta"] == pytest.approx(max(out["grad_change"] / (np.array([0.1, 1.0])
                                                                  * out["grad_norm"])))


def test_median_movement_is_the_median_range_over_the_mean_spread():
    rng = np.random.default_rng(8)
    snaps = [rng.normal(size=(50, 4)) * (1 + t) + t for t in range(5)]
    tracker = tracking.ActivationTracker()
    for step, z in enumerate(snaps):
        tracker.record(step, [z])
    q15, q50, q85 = (np.array([np.percentile(z, q, axis=0) for z in snaps]) for q in (15, 50, 85))
    expected = (q50.max(0) - q50.min(0)) / (q85 - q15).mean(0)
    np.testing.assert_allclose(tracking.median_movement(tracker, 0), expected)


def test_steps_to_reads_the_first_step_at_the_level():
    history = {"step": [0, 50, 100, 150], "test_acc": [0.1, 0.85, 0.92, 0.9]}
    assert steps_to(history, 0.9) == 100
    assert steps_to(history, 0.95) is None
