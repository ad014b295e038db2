"""bncore.numpy's layer norm and group norm against torch.nn.functional, numerical gradients
and their defining properties."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bncore.numpy as bnp

TORCH_DTYPE = {np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}
TOL = {np.float32: {"rtol": 1e-4, "atol": 5e-5}, np.float64: {"rtol": 1e-9, "atol": 1e-11}}
SHAPES = {"2d": (5, 6), "3d": (4, 6, 5), "4d": (3, 6, 4, 2)}


def data(rng, shape, dtype=np.float64, loc=0.0):
    """Every example with its own offset and spread, so per-example statistics matter."""
    per_example = (shape[0],) + (1,) * (len(shape) - 1)
    shift = rng.uniform(-3, 3, size=per_example)
    spread = rng.uniform(0.5, 3, size=per_example)
    return (loc + shift + spread * rng.normal(size=shape)).astype(dtype)


def torch_reference(fn, x, gamma, beta, dy, **kwargs):
    """(y, dx, dgamma, dbeta) from torch autograd; None where gamma or beta is None."""
    dtype = TORCH_DTYPE[x.dtype.type]
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    gt = None if gamma is None else torch.tensor(gamma, dtype=dtype, requires_grad=True)
    bt = None if beta is None else torch.tensor(beta, dtype=dtype, requires_grad=True)
    y = fn(xt, weight=gt, bias=bt, **kwargs)
    y.backward(torch.tensor(dy, dtype=dtype))
    grad = [None if t is None else t.grad.numpy() for t in (gt, bt)]
    return y.detach().numpy(), xt.grad.numpy(), grad[0], grad[1]


def torch_layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, x.shape[1:], weight, bias, eps)


def assert_close(ours, theirs, dtype):
    if ours is None or theirs is None:
        assert ours is None and theirs is None
        return
    np.testing.assert_allclose(ours, theirs, **TOL[dtype])


# ------------------------------------------------------------------ against torch

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
@pytest.mark.parametrize("affine", ["both", "gamma-only", "none"])
def test_layer_norm_matches_torch_forward_and_backward(shape, dtype, affine, rng):
    x, dy = data(rng, shape, dtype), rng.normal(size=shape).astype(dtype)
    gamma = rng.uniform(0.5, 2, size=shape[1:]).astype(dtype) if affine != "none" else None
    beta = rng.normal(size=shape[1:]).astype(dtype) if affine == "both" else None
    y, cache = bnp.layer_norm_forward(x, gamma, beta, eps=1e-3)
    dx, dgamma, dbeta = bnp.layer_norm_backward(dy, cache)
    ref = torch_reference(torch_layer_norm, x, gamma, beta, dy, eps=1e-3)
    for ours, theirs in zip((y, dx, dgamma, dbeta), ref, strict=True):
        assert_close(ours, theirs, dtype)
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == shape


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
@pytest.mark.parametrize("num_groups", [1, 2, 3, 6])
def test_group_norm_matches_torch_forward_and_backward(shape, dtype, num_groups, rng):
    x, dy = data(rng, shape, dtype), rng.normal(size=shape).astype(dtype)
    gamma = rng.uniform(0.5, 2, size=shape[1]).astype(dtype)
    beta = rng.normal(size=shape[1]).astype(dtype)
    y, cache = bnp.group_norm_forward(x, gamma, beta, num_groups, eps=1e-3)
    dx, dgamma, dbeta = bnp.group_norm_backward(dy, cache)
    ref = torch_reference(F.group_norm, x, gamma, beta, dy, num_groups=num_groups, eps=1e-3)
    for ours, theirs in zip((y, dx, dgamma, dbeta), ref, strict=True):
        assert_close(ours, theirs, dtype)


def test_group_norm_without_gamma_and_beta_acts_as_one_and_zero(rng):
    x, dy = data(rng, (4, 6, 3)), rng.normal(size=(4, 6, 3))
    y, cache = bnp.group_norm_forward(x, None, None, 3)
    dx, dgamma, dbeta = bnp.group_norm_backward(dy, cache)
    ref = torch_reference(F.group_norm, x, None, None, dy, num_groups=3)
    np.testing.assert_allclose(y, ref[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dx, ref[1], rtol=1e-9, atol=1e-11)
    assert dgamma is None and dbeta is None


def test_group_norm_with_one_group_per_channel_is_instance_norm(rng):
    x = data(rng, (3, 4, 5, 5))
    gamma, beta = rng.uniform(0.5, 2, size=4), rng.normal(size=4)
    y, _ = bnp.group_norm_forward(x, gamma, beta, num_groups=4)
    ref = F.instance_norm(torch.tensor(x), weight=torch.tensor(gamma), bias=torch.tensor(beta))
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-9, atol=1e-11)


def test_group_norm_with_one_group_is_layer_norm_with_a_gamma_per_channel(rng):
    x = data(rng, (3, 4, 5, 5))
    gamma, beta = rng.uniform(0.5, 2, size=4), rng.normal(size=4)
    y_group, _ = bnp.group_norm_forward(x, gamma, beta, num_groups=1)
    per_value = np.broadcast_to(gamma[:, None, None], x.shape[1:])
    shift = np.broadcast_to(beta[:, None, None], x.shape[1:])
    y_layer, _ = bnp.layer_norm_forward(x, per_value, shift)
    np.testing.assert_allclose(y_group, y_layer, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("forward", ["layer", "group"])
def test_float16_input_is_computed_in_float32_and_returned_as_float16(forward, rng):
    x = data(rng, (4, 6, 5), np.float16)
    if forward == "layer":
        y, cache = bnp.layer_norm_forward(x, None, None)
        ref = F.layer_norm(torch.tensor(x, dtype=torch.float32), x.shape[1:])
        dx = bnp.layer_norm_backward(np.ones_like(x), cache)[0]
    else:
        y, cache = bnp.group_norm_forward(x, None, None, 2)
        ref = F.group_norm(torch.tensor(x, dtype=torch.float32), 2)
        dx = bnp.group_norm_backward(np.ones_like(x), cache)[0]
    assert y.dtype == dx.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), ref.numpy(), atol=2e-3, rtol=1e-3)


# ------------------------------------------------------------------ numerical gradients

def vector_rel_error(a, b):
    """||a - b|| / (||a|| + ||b||): for gradients with entries near 0 (groups of two values,
    where x_hat is +-1 whatever x is), an elementwise relative error measures only noise."""
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300)


def numerical_and_analytic(forward, backward, x, gamma, beta, dy, **kwargs):
    y, cache = forward(x, gamma, beta, **kwargs)
    analytic = backward(dy, cache)
    numeric = [
        bnp.numerical_gradient(lambda v: forward(v, gamma, beta, **kwargs)[0], x, dy),
        bnp.numerical_gradient(lambda v: forward(x, v, beta, **kwargs)[0], gamma, dy),
        bnp.numerical_gradient(lambda v: forward(x, gamma, v, **kwargs)[0], beta, dy),
    ]
    return analytic, numeric


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_layer_norm_backward_matches_numerical_gradient(shape, rng):
    x, dy = data(rng, shape), rng.normal(size=shape)
    gamma, beta = rng.uniform(0.5, 2, size=shape[1:]), rng.normal(size=shape[1:])
    analytic, numeric = numerical_and_analytic(bnp.layer_norm_forward, bnp.layer_norm_backward,
                                               x, gamma, beta, dy)
    for a, n in zip(analytic, numeric, strict=True):
        assert bnp.rel_error(a, n) < 1e-6


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
@pytest.mark.parametrize("num_groups", [1, 3, 6])
def test_group_norm_backward_matches_numerical_gradient(shape, num_groups, rng):
    x, dy = data(rng, shape), rng.normal(size=shape)
    gamma, beta = rng.uniform(0.5, 2, size=shape[1]), rng.normal(size=shape[1])
    analytic, numeric = numerical_and_analytic(bnp.group_norm_forward, bnp.group_norm_backward,
                                               x, gamma, beta, dy, num_groups=num_groups)
    for a, n in zip(analytic, numeric, strict=True):
        assert vector_rel_error(a, n) < 1e-7


# ------------------------------------------------------------------ properties

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), groups=st.sampled_from([1, 2, 4]),
       scale=st.floats(1e-2, 1e3), offset=st.floats(-1e3, 1e3))
def test_group_norm_ignores_an_affine_change_of_each_group(seed, n, groups, scale, offset):
    """Normalizing a * x + b, with a > 0 and b the same within a group, gives the output of x."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4, 3))
    a = scale * rng.uniform(0.5, 2, size=(n, groups, 1))
    b = offset * rng.uniform(-1, 1, size=(n, groups, 1))
    moved = (x.reshape(n, groups, -1) * a + b).reshape(x.shape)
    # eps far below every group's variance: a group's eps does not scale with its a^2, so a
    # larger eps would tell a small-scale group from the original by itself.
    y, _ = bnp.group_norm_forward(x, None, None, groups, eps=1e-30)
    y_moved, _ = bnp.group_norm_forward(moved, None, None, groups, eps=1e-30)
    np.testing.assert_allclose(y_moved, y, atol=1e-6)


@pytest.mark.parametrize("forward", ["layer", "group"])
def test_each_example_is_normalized_on_its_own(forward, rng):
    """Every example's output is that of the example alone: the batch plays no part."""
    x = data(rng, (6, 4, 3))

    def run(v):
        if forward == "layer":
            return bnp.layer_norm_forward(v, None, None)[0]
        return bnp.group_norm_forward(v, None, None, 2)[0]

    whole = run(x)
    for n in range(len(x)):
        np.testing.assert_allclose(whole[n:n + 1], run(x[n:n + 1]), rtol=1e-12, atol=1e-12)
    groups = whole.reshape(6, 1 if forward == "layer" else 2, -1)
    np.testing.assert_allclose(groups.mean(axis=2), 0, atol=1e-12)
    np.testing.assert_allclose(groups.var(axis=2), 1, atol=1e-4)   # 1 up to eps / var


@pytest.mark.parametrize("forward", ["layer", "group"])
def test_large_offset_does_not_destroy_the_statistics(forward, rng):
    x = data(rng, (4, 4, 8))
    if forward == "layer":
        y, _ = bnp.layer_norm_forward(x, None, None)
        y_far, _ = bnp.layer_norm_forward(x + 1e8, None, None)
    else:
        y, _ = bnp.group_norm_forward(x, None, None, 2)
        y_far, _ = bnp.group_norm_forward(x + 1e8, None, None, 2)
    np.testing.assert_allclose(y_far, y, atol=1e-6)


def test_empty_batch_gives_empty_output(rng):
    y, cache = bnp.layer_norm_forward(np.zeros((0, 3)), np.ones(3), np.zeros(3))
    dx, dgamma, dbeta = bnp.layer_norm_backward(np.zeros((0, 3)), cache)
    assert y.shape == dx.shape == (0, 3)
    np.testing.assert_array_equal(dgamma, 0)
    y, cache = bnp.group_norm_forward(np.zeros((0, 4, 2)), None, None, 2)
    assert y.shape == bnp.group_norm_backward(np.zeros((0, 4, 2)), cache)[0].shape == (0, 4, 2)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call", [
    lambda x: bnp.layer_norm_forward(x, None, None),
    lambda x: bnp.group_norm_forward(x, None, None, 2),
], ids=["layer", "group"])
def test_integer_input_raises_type_error(call):
    with pytest.raises(TypeError, match="floating-point"):
        call(np.ones((4, 4), dtype=np.int64))


@pytest.mark.parametrize("call", [
    lambda x: bnp.layer_norm_forward(x, None, None),
    lambda x: bnp.group_norm_forward(x, None, None, 1),
], ids=["layer", "group"])
def test_one_dimensional_input_raises_value_error_naming_the_shape(call):
    with pytest.raises(ValueError, match=r"\(5,\)"):
        call(np.ones(5))


def test_layer_norm_gamma_of_another_shape_raises_value_error_naming_both(rng):
    x = rng.normal(size=(4, 3, 2))
    with pytest.raises(ValueError, match=r"gamma must have shape \(3, 2\).*\(4, 3, 2\).*\(3,\)"):
        bnp.layer_norm_forward(x, np.ones(3), None)
    with pytest.raises(ValueError, match=r"beta must have shape \(3, 2\)"):
        bnp.layer_norm_forward(x, None, np.ones((2, 3)))


def test_group_norm_gamma_of_another_shape_raises_value_error_naming_both(rng):
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\).*\(2, 4, 3\).*\(3,\)"):
        bnp.group_norm_forward(rng.normal(size=(2, 4, 3)), np.ones(3), None, 2)


@pytest.mark.parametrize("num_groups", [3, 0, -2, 8])
def test_group_norm_num_groups_must_divide_the_channels(num_groups, rng):
    with pytest.raises(ValueError, match=rf"C = 4.*num_groups={num_groups}"):
        bnp.group_norm_forward(rng.normal(size=(2, 4, 3)), None, None, num_groups)


def test_group_norm_num_groups_must_be_an_integer(rng):
    with pytest.raises(TypeError):
        bnp.group_norm_forward(rng.normal(size=(2, 4, 3)), None, None, 2.0)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_non_positive_eps_raises_value_error(eps, rng):
    x = rng.normal(size=(2, 4))
    with pytest.raises(ValueError, match="eps"):
        bnp.layer_norm_forward(x, None, None, eps=eps)
    with pytest.raises(ValueError, match="eps"):
        bnp.group_norm_forward(x, None, None, 2, eps=eps)


def test_backward_rejects_dy_of_another_shape_and_a_cache_of_another_kind(rng):
    x = rng.normal(size=(2, 4, 3))
    _, layer_cache = bnp.layer_norm_forward(x, None, None)
    _, group_cache = bnp.group_norm_forward(x, None, None, 2)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 4, 3\)"):
        bnp.layer_norm_backward(np.ones((2, 4)), layer_cache)
    with pytest.raises(ValueError, match="group_norm_forward, not from layer_norm_forward"):
        bnp.layer_norm_backward(np.ones_like(x), group_cache)
    _, bn_cache = bnp.batch_norm_forward(x, None, None)
    with pytest.raises(ValueError, match="another forward pass"):
        bnp.group_norm_backward(np.ones_like(x), bn_cache)


def test_forward_and_backward_leave_their_inputs_unchanged(rng):
    x, dy = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 4, 2))
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    copies = [v.copy() for v in (x, dy, gamma, beta)]
    _, cache = bnp.group_norm_forward(x, gamma, beta, 2)
    bnp.group_norm_backward(dy, cache)
    _, cache = bnp.layer_norm_forward(x, None, None)
    bnp.layer_norm_backward(dy, cache)
    for before, after in zip(copies, (x, dy, gamma, beta), strict=True):
        np.testing.assert_array_equal(before, after)
