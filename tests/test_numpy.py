"""bncore.numpy against its oracles: torch.nn, scikit-learn, numerical gradients, properties."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.preprocessing import StandardScaler

import bncore.numpy as bnp

TORCH_DTYPE = {np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}
TOL = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float64: {"rtol": 1e-9, "atol": 1e-11}}
SHAPES = {"2d": (16, 3), "3d": (4, 3, 5), "4d": (3, 3, 4, 2)}
OPTIONS = {
    "defaults": {},
    "eps": {"eps": 1e-2},
    "momentum": {"momentum": 0.3},
    "momentum-none": {"momentum": None},
    "momentum-0": {"momentum": 0.0},
    "momentum-1": {"momentum": 1.0},
    "no-affine": {"affine": False},
    "no-bias": {"bias": False},
    "no-tracking": {"track_running_stats": False},
    "no-affine-no-tracking": {"affine": False, "track_running_stats": False, "momentum": None},
}


def torch_layer(ndim, num_features, dtype=np.float64, **options):
    cls = torch.nn.BatchNorm2d if ndim == 4 else torch.nn.BatchNorm1d
    return cls(num_features, **options).to(TORCH_DTYPE[dtype])


def torch_forward_backward(layer, x, dy):
    """Output and input gradient from torch autograd (parameter grads reset first)."""
    layer.zero_grad(set_to_none=True)
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy()


def as_numpy(t):
    return None if t is None else t.detach().numpy()


def batch(rng, shape, dtype=np.float64, loc=0.0, scale=1.0):
    """Random data with a per-channel offset and spread, so every channel has its own stats."""
    c = shape[1]
    per_channel = (1, c) + (1,) * (len(shape) - 2)
    shift = rng.uniform(-3, 3, size=c).reshape(per_channel)
    spread = rng.uniform(0.5, 3, size=c).reshape(per_channel)
    return (loc + shift + scale * spread * rng.normal(size=shape)).astype(dtype)


def copy_parameters(ours, theirs, rng):
    """Give both layers the same random gamma and beta."""
    if ours.gamma is not None:
        ours.gamma = rng.uniform(0.5, 2, size=ours.num_features)
        theirs.weight.data = torch.tensor(ours.gamma, dtype=theirs.weight.dtype)
    if ours.beta is not None:
        ours.beta = rng.normal(size=ours.num_features)
        theirs.bias.data = torch.tensor(ours.beta, dtype=theirs.bias.dtype)


def state(layer):
    """Copies of everything a rejected call must leave alone."""
    copy = [None if v is None else np.array(v, copy=True)
            for v in (layer.running_mean, layer.running_var, layer.gamma, layer.beta)]
    return copy + [layer.num_batches_tracked, layer.training]


def assert_same_state(before, after):
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def trained_layer(rng, shape=(8, 3)):
    """A BatchNorm that has seen two training batches, so its buffers are not the defaults."""
    layer = bnp.BatchNorm(shape[1])
    for _ in range(2):
        layer(batch(rng, shape))
    return layer


# --- the layer against torch.nn ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_layer_matches_torch_through_training_and_eval(options, shape, dtype, rng):
    ours = bnp.BatchNorm(shape[1], **options)
    theirs = torch_layer(len(shape), shape[1], dtype, **options)
    copy_parameters(ours, theirs, rng)
    for step, training in enumerate([True, True, True, False, False, True, False]):
        ours.train(training)
        theirs.train(training)
        x = batch(rng, shape, dtype, loc=step, scale=1 + step / 2)
        dy = rng.normal(size=shape).astype(dtype)
        y, dx = ours(x), ours.backward(dy)
        y_torch, dx_torch = torch_forward_backward(theirs, x, dy)
        assert y.dtype == dtype and dx.dtype == dtype
        np.testing.assert_allclose(y, y_torch, **TOL[dtype])
        np.testing.assert_allclose(dx, dx_torch, **TOL[dtype])
        for grad, param in [(ours.dgamma, theirs.weight), (ours.dbeta, theirs.bias)]:
            if param is None:
                assert grad is None
            else:
                np.testing.assert_allclose(grad, as_numpy(param.grad), **TOL[dtype])
        if theirs.track_running_stats:
            np.testing.assert_allclose(ours.running_mean, as_numpy(theirs.running_mean),
                                       **TOL[dtype])
            np.testing.assert_allclose(ours.running_var, as_numpy(theirs.running_var),
                                       **TOL[dtype])
            assert ours.num_batches_tracked == int(theirs.num_batches_tracked)
        else:
            assert ours.running_mean is ours.running_var is ours.num_batches_tracked is None


def test_running_var_uses_unbiased_estimate(rng):
    x = batch(rng, (5, 3, 2))
    layer = bnp.BatchNorm(3, momentum=1.0)  # momentum 1: the running stats are the batch's
    y = layer(x)
    t = torch.tensor(x)
    unbiased = torch.var(t, dim=(0, 2), correction=1).numpy()
    np.testing.assert_allclose(layer.running_var, unbiased, rtol=1e-12)
    np.testing.assert_allclose(layer.running_mean, t.mean(dim=(0, 2)).numpy(), rtol=1e-12)
    # ... while the output itself was normalized with the biased variance
    biased = torch.var(t, dim=(0, 2), correction=0)
    expected = (t - t.mean(dim=(0, 2), keepdim=True)) / torch.sqrt(biased[None, :, None] + 1e-5)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-10, atol=1e-12)


def test_momentum_none_gives_cumulative_average_of_batch_statistics(rng):
    layer = bnp.BatchNorm(2, momentum=None)
    xs = [batch(rng, (6, 2)) for _ in range(5)]
    for x in xs:
        layer(x)
    ts = [torch.tensor(x) for x in xs]
    np.testing.assert_allclose(layer.running_mean, torch.stack([t.mean(0) for t in ts]).mean(0),
                               rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, torch.stack([t.var(0) for t in ts]).mean(0),
                               rtol=1e-12)
    assert layer.num_batches_tracked == 5


def test_num_batches_tracked_counts_training_batches_only(rng):
    ours, theirs = bnp.BatchNorm(3), torch.nn.BatchNorm1d(3).double()
    for training in [True, False, True, True, False, False]:
        x = batch(rng, (4, 3))
        ours.train(training)(x)
        theirs.train(training)(torch.tensor(x))
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked) == 3


def test_eval_mode_uses_running_statistics_and_treats_samples_independently(rng):
    layer = trained_layer(rng).eval()
    x = batch(rng, (6, 3))
    y = layer(x)
    expected = F.batch_norm(torch.tensor(x), torch.tensor(layer.running_mean),
                            torch.tensor(layer.running_var), training=False).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    np.testing.assert_allclose(layer(x[2:3]), y[2:3], rtol=1e-12)  # a batch of one is fine
    np.testing.assert_allclose(
        bnp.batch_norm_inference(x, layer.running_mean, layer.running_var, None, None), y)


def test_train_and_eval_switch_the_mode_and_return_the_layer():
    layer = bnp.BatchNorm(4)
    assert layer.training
    assert layer.eval() is layer and not layer.training
    assert layer.train() is layer and layer.training
    assert layer.train(False) is layer and not layer.training


def test_float16_input_is_accumulated_in_float32_and_returned_as_float16(rng):
    # 4096 values near 30 sum to about 1.2e5: past float16's largest number, 65504
    x = batch(rng, (4096, 2), np.float16, loc=30.0)
    dy = rng.normal(size=x.shape).astype(np.float16)
    layer = bnp.BatchNorm(2)
    y, dx = layer(x), layer.backward(dy)
    assert y.dtype == dx.dtype == np.float16
    y64, dx64 = torch_forward_backward(torch.nn.BatchNorm1d(2).double(), x.astype(np.float64),
                                       dy.astype(np.float64))
    np.testing.assert_allclose(y, y64, atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(dx, dx64, atol=1e-2, rtol=1e-2)
    theirs = torch.nn.BatchNorm1d(2)  # float32 parameters, float16 input: torch's mixed mode
    np.testing.assert_allclose(y, theirs(torch.tensor(x)).detach().numpy(), atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(layer.running_mean, theirs.running_mean.numpy(), rtol=1e-3)
    np.testing.assert_allclose(layer.running_var, theirs.running_var.numpy(), rtol=1e-3)


@pytest.mark.parametrize("shape", [(0, 3), (2, 3, 0), (0, 3, 4, 4)])
def test_empty_batch_gives_empty_output_and_counts_like_torch(shape):
    ours, theirs = bnp.BatchNorm(3), torch_layer(len(shape), 3)
    x, dy = np.zeros(shape), np.ones(shape)
    y, dx = ours(x), ours.backward(dy)
    y_torch, dx_torch = torch_forward_backward(theirs, x, dy)
    assert y.shape == y_torch.shape and dx.shape == dx_torch.shape
    np.testing.assert_array_equal(ours.dgamma, theirs.weight.grad.numpy())
    np.testing.assert_array_equal(ours.running_mean, theirs.running_mean.numpy())
    np.testing.assert_array_equal(ours.running_var, theirs.running_var.numpy())
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked)


def test_backward_before_forward_raises_runtime_error():
    with pytest.raises(RuntimeError, match="forward"):
        bnp.BatchNorm(3).backward(np.ones((2, 3)))


def test_backward_rejects_dy_of_another_shape(rng):
    _, cache = bnp.batch_norm_forward(batch(rng, (4, 3)), None, None)
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
        bnp.batch_norm_backward(np.ones((4, 2)), cache)


# --- the functions against torch.nn.functional -------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_and_backward_match_torch_functional_batch_norm(shape, dtype, rng):
    c = shape[1]
    x, dy = batch(rng, shape, dtype), rng.normal(size=shape).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, c).astype(dtype), rng.normal(size=c).astype(dtype)
    y, cache = bnp.batch_norm_forward(x, gamma, beta, eps=1e-3)
    dx, dgamma, dbeta = bnp.batch_norm_backward(dy, cache)

    xt, gt, bt = (torch.tensor(v, requires_grad=True) for v in (x, gamma, beta))
    yt = F.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-3)
    yt.backward(torch.tensor(dy))
    for ours, theirs in [(y, yt), (dx, xt.grad), (dgamma, gt.grad), (dbeta, bt.grad)]:
        assert ours.dtype == dtype
        np.testing.assert_allclose(ours, as_numpy(theirs), **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inference_matches_torch_functional_batch_norm_in_eval(dtype, rng):
    x = batch(rng, (3, 4, 5, 2), dtype)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 3, size=4)
    gamma, beta = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    y = bnp.batch_norm_inference(x, mean, var, gamma, beta, eps=1e-4)
    tensors = (torch.tensor(v, dtype=TORCH_DTYPE[dtype]) for v in (mean, var, gamma, beta))
    expected = F.batch_norm(torch.tensor(x), *tensors, training=False, eps=1e-4)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, expected.numpy(), **TOL[dtype])


def test_functions_without_gamma_and_beta_act_as_one_and_zero(rng):
    x, dy = batch(rng, (5, 3, 2)), rng.normal(size=(5, 3, 2))
    y, cache = bnp.batch_norm_forward(x, None, None)
    y1, cache1 = bnp.batch_norm_forward(x, np.ones(3), np.zeros(3))
    np.testing.assert_array_equal(y, y1)
    y[...] = 0  # the output is the caller's: changing it must not change the cache
    dx, dgamma, dbeta = bnp.batch_norm_backward(dy, cache)
    np.testing.assert_array_equal(dx, bnp.batch_norm_backward(dy, cache1)[0])
    assert dgamma is None and dbeta is None


# --- gradient checks ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_backward_matches_numerical_gradient(shape, rng):
    c = shape[1]
    x, dy = batch(rng, shape, loc=5.0), rng.normal(size=shape)
    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(size=c)
    _, cache = bnp.batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = bnp.batch_norm_backward(dy, cache)

    def forward(x=x, gamma=gamma, beta=beta):
        return bnp.batch_norm_forward(x, gamma, beta)[0]

    assert bnp.rel_error(dx, bnp.numerical_gradient(lambda v: forward(x=v), x, dy)) < 1e-7
    assert bnp.rel_error(dgamma, bnp.numerical_gradient(lambda v: forward(gamma=v), gamma, dy)) \
        < 1e-7
    assert bnp.rel_error(dbeta, bnp.numerical_gradient(lambda v: forward(beta=v), beta, dy)) \
        < 1e-7


def test_eval_mode_backward_matches_numerical_gradient(rng):
    layer = trained_layer(rng, (4, 3, 3)).eval()
    layer.gamma, layer.beta = rng.uniform(0.5, 2, 3), rng.normal(size=3)
    x, dy = batch(rng, (4, 3, 3)), rng.normal(size=(4, 3, 3))
    layer(x)
    dx = layer.backward(dy)
    assert bnp.rel_error(dx, bnp.numerical_gradient(layer, x, dy)) < 1e-7
    gamma = layer.gamma.copy()

    def with_gamma(g):
        layer.gamma = g
        return layer(x)

    assert bnp.rel_error(layer.dgamma, bnp.numerical_gradient(with_gamma, gamma, dy)) < 1e-7


def test_numerical_gradient_leaves_x_unchanged_and_differentiates_correctly(rng):
    x = rng.normal(size=(3, 4))
    before = x.copy()
    dy = rng.normal(size=(3, 4))
    grad = bnp.numerical_gradient(np.sin, x, dy)
    np.testing.assert_array_equal(x, before)
    assert bnp.rel_error(grad, np.cos(x) * dy) < 1e-8


def test_rel_error_is_cs231n_max_relative_error_with_a_floor():
    assert bnp.rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.2])) == pytest.approx(0.2 / 4.2)
    assert bnp.rel_error(0.0, 1e-10) == pytest.approx(1e-10 / 1e-8)  # tiny values: the floor
    assert bnp.rel_error(np.ones(3), np.ones(3)) == 0.0


# --- properties --------------------------------------------------------------------------

shapes = st.sampled_from([2, 3, 4]).flatmap(
    lambda nd: st.tuples(st.integers(2, 6), st.integers(1, 4),
                         *[st.integers(1, 3)] * (nd - 2)))
seeds = st.integers(0, 2**32 - 1)


@settings(deadline=None, max_examples=40)
@given(shape=shapes, seed=seeds, data=st.data())
def test_affine_transform_of_input_per_channel_leaves_training_output_unchanged(shape, seed,
                                                                                data):
    rng = np.random.default_rng(seed)
    c = shape[1]
    per_channel = (1, c) + (1,) * (len(shape) - 2)
    a = np.array(data.draw(st.lists(st.floats(0.1, 10), min_size=c, max_size=c)))
    b = np.array(data.draw(st.lists(st.floats(-100, 100), min_size=c, max_size=c)))
    x = rng.normal(size=shape)
    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(size=c)
    # eps far below every variance here: the invariance is exact only as eps / var -> 0
    y = bnp.batch_norm_forward(x, gamma, beta, eps=1e-300)[0]
    y_moved = bnp.batch_norm_forward(a.reshape(per_channel) * x + b.reshape(per_channel),
                                     gamma, beta, eps=1e-300)[0]
    np.testing.assert_allclose(y_moved, y, rtol=1e-7, atol=1e-7)


@settings(deadline=None, max_examples=40)
@given(shape=shapes, seed=seeds, loc=st.floats(-1e3, 1e3), scale=st.floats(1e-2, 1e2))
def test_training_output_has_zero_mean_and_unit_variance_per_channel(shape, seed, loc, scale):
    x = loc + scale * np.random.default_rng(seed).normal(size=shape)
    eps = 1e-5
    y = bnp.BatchNorm(shape[1], eps=eps)(x)
    axes = (0, *range(2, len(shape)))
    np.testing.assert_allclose(y.mean(axis=axes), 0, atol=1e-8)
    # var(y) = var / (var + eps): 1 up to eps
    var = x.var(axis=axes)
    np.testing.assert_allclose(y.var(axis=axes), var / (var + eps), rtol=1e-8)
    assert np.all(y.var(axis=axes) <= 1)


@settings(deadline=None, max_examples=30)
@given(shape=shapes, seed=seeds, dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       affine=st.booleans(), training=st.booleans())
def test_shapes_and_dtypes_are_preserved(shape, seed, dtype, affine, training):
    rng = np.random.default_rng(seed)
    x, dy = rng.normal(size=shape).astype(dtype), rng.normal(size=shape).astype(dtype)
    layer = bnp.BatchNorm(shape[1], affine=affine).train(training)
    y = layer(x)
    dx = layer.backward(dy)
    assert y.shape == dx.shape == x.shape
    assert y.dtype == dx.dtype == dtype
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert layer.running_mean.shape == layer.running_var.shape == (shape[1],)
    y_fn, cache = bnp.batch_norm_forward(x, None, None)
    assert y_fn.shape == x.shape and y_fn.dtype == dtype
    assert bnp.batch_norm_backward(dy, cache)[0].dtype == dtype


# --- Standardizer against scikit-learn ---------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_standardizer_matches_sklearn_standard_scaler(dtype, rng):
    # (a float32 feature far from 0 is left out: scikit-learn rounds its float64 mean to
    # float32 before subtracting it, bncore does not)
    offset = 1e6 if dtype == np.float64 else 1e2
    X = (rng.normal(size=(40, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -2, offset, 0]).astype(dtype)
    X[:, 4] = 0.1  # a constant feature
    X_new = (rng.normal(size=(7, 5)) * 3).astype(dtype)
    ours, theirs = bnp.Standardizer(), StandardScaler()
    Z = ours.fit_transform(X)
    np.testing.assert_allclose(Z, theirs.fit_transform(X), rtol=1e-5 if dtype == np.float32
                               else 1e-12, atol=1e-6 if dtype == np.float32 else 1e-12)
    for name in ["mean_", "var_", "scale_"]:
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-12)
    assert ours.n_samples_seen_ == theirs.n_samples_seen_
    assert ours.n_features_in_ == theirs.n_features_in_
    assert Z.dtype == theirs.transform(X).dtype == dtype
    np.testing.assert_allclose(ours.transform(X_new), theirs.transform(X_new), rtol=1e-5)
    np.testing.assert_allclose(ours.inverse_transform(X_new), theirs.inverse_transform(X_new),
                               rtol=1e-6)
    np.testing.assert_allclose(ours.inverse_transform(Z), X, rtol=1e-5)


def test_standardizer_maps_constant_feature_to_zero_not_nan(rng):
    X = np.column_stack([rng.normal(size=9), np.full(9, 0.1), np.full(9, 7.3e5)])
    Z = bnp.Standardizer().fit_transform(X)
    np.testing.assert_array_equal(Z[:, 1:], 0.0)
    np.testing.assert_allclose(Z, StandardScaler().fit_transform(X), atol=1e-12)


def test_standardizer_ignores_nan_in_fit_and_keeps_it_in_transform(rng):
    X = rng.normal(size=(12, 3))
    X[[1, 5], 0], X[7, 2] = np.nan, np.nan
    ours, theirs = bnp.Standardizer().fit(X), StandardScaler().fit(X)
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.scale_, theirs.scale_, rtol=1e-12)
    np.testing.assert_array_equal(ours.n_samples_seen_, theirs.n_samples_seen_)
    np.testing.assert_allclose(ours.transform(X), theirs.transform(X), rtol=1e-12)


def test_standardizer_converts_integer_data_to_float64_like_sklearn(rng):
    X = rng.integers(0, 10, size=(10, 3))
    np.testing.assert_allclose(bnp.Standardizer().fit_transform(X),
                               StandardScaler().fit_transform(X), rtol=1e-12)


def test_standardizer_transform_before_fit_raises_not_fitted_error():
    for method in ["transform", "inverse_transform"]:
        with pytest.raises(bnp.NotFittedError, match="fit"):
            getattr(bnp.Standardizer(), method)(np.ones((2, 3)))
    assert issubclass(bnp.NotFittedError, ValueError)  # as scikit-learn's


def test_standardizer_wrong_feature_count_raises_value_error_naming_both(rng):
    scaler = bnp.Standardizer().fit(rng.normal(size=(5, 4)))
    for method in ["transform", "inverse_transform"]:
        with pytest.raises(ValueError, match=r"3 features.*4 features"):
            getattr(scaler, method)(rng.normal(size=(5, 3)))


@pytest.mark.parametrize("X", [np.ones(5), np.ones((2, 3, 4)), np.ones((0, 3))],
                         ids=["1d", "3d", "empty"])
def test_standardizer_rejects_what_sklearn_rejects(X):
    with pytest.raises(ValueError):
        StandardScaler().fit(X)
    with pytest.raises(ValueError):
        bnp.Standardizer().fit(X)


# --- folding ------------------------------------------------------------------------------


def eval_layer_with_statistics(rng, num_features, **options):
    """An eval-mode BatchNorm with random parameters and trained running statistics."""
    bn = bnp.BatchNorm(num_features, **options)
    if bn.gamma is not None:
        bn.gamma = rng.uniform(0.5, 2, num_features)
    if bn.beta is not None:
        bn.beta = rng.normal(size=num_features)
    for _ in range(3):
        bn(batch(rng, (8, num_features)))
    return bn.eval()


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("options", [{}, {"affine": False}, {"bias": False}],
                         ids=["affine", "no-affine", "no-bias"])
def test_fold_batch_norm_into_linear_matches_linear_then_bn(has_bias, options, rng):
    bn = eval_layer_with_statistics(rng, 4, **options)
    weight = rng.normal(size=(4, 6))
    bias = rng.normal(size=4) if has_bias else None
    x = rng.normal(size=(10, 6))

    def linear(w, b):
        return F.linear(torch.tensor(x), torch.tensor(w),
                        None if b is None else torch.tensor(b)).numpy()

    expected = bn(linear(weight, bias))
    folded_weight, folded_bias = bnp.fold_batch_norm(weight, bias, bn)
    assert folded_weight.shape == weight.shape and folded_bias.shape == (4,)
    np.testing.assert_allclose(linear(folded_weight, folded_bias), expected, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("has_bias", [True, False])
def test_fold_batch_norm_into_conv_matches_conv_then_bn(has_bias, dtype, rng):
    bn = eval_layer_with_statistics(rng, 5)
    weight = rng.normal(size=(5, 2, 3, 3)).astype(dtype)
    bias = rng.normal(size=5).astype(dtype) if has_bias else None
    x = rng.normal(size=(4, 2, 7, 6)).astype(dtype)

    def conv(w, b):
        return F.conv2d(torch.tensor(x), torch.tensor(w),
                        None if b is None else torch.tensor(b), padding=1).numpy()

    expected = bn(conv(weight, bias))
    folded_weight, folded_bias = bnp.fold_batch_norm(weight, bias, bn)
    assert folded_weight.dtype == folded_bias.dtype == dtype
    np.testing.assert_allclose(conv(folded_weight, folded_bias), expected, **TOL[dtype])


def test_fold_batch_norm_rejects_a_layer_it_cannot_fold(rng):
    with pytest.raises(ValueError, match="eval"):
        bnp.fold_batch_norm(np.ones((3, 2)), None, bnp.BatchNorm(3))  # training mode
    with pytest.raises(ValueError, match="running statistics"):
        bnp.fold_batch_norm(np.ones((3, 2)), None,
                            bnp.BatchNorm(3, track_running_stats=False).eval())
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        bnp.fold_batch_norm(np.ones((4, 2)), None, bnp.BatchNorm(3).eval())


# --- ema_update ---------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_ema_update_matches_torch_running_stat_update(momentum, rng):
    x = batch(rng, (6, 3))
    running_mean, running_var = rng.normal(size=3), rng.uniform(0.5, 2, size=3)
    rm, rv = torch.tensor(running_mean), torch.tensor(running_var)
    F.batch_norm(torch.tensor(x), rm, rv, training=True, momentum=momentum)  # updates rm, rv
    t = torch.tensor(x)
    new_mean = bnp.ema_update(running_mean, t.mean(0).numpy(), momentum)
    new_var = bnp.ema_update(running_var, t.var(0, correction=1).numpy(), momentum)
    np.testing.assert_allclose(new_mean, rm.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(new_var, rv.numpy(), rtol=1e-12)


def test_ema_update_returns_a_new_array(rng):
    running = rng.normal(size=3)
    before = running.copy()
    bnp.ema_update(running, np.zeros(3), 0.5)
    np.testing.assert_array_equal(running, before)


# --- bad input: one clear error, and the layer left as it was -----------------------------


def re_shape(shape):
    """A regular expression matching a shape as Python prints it."""
    return str(shape).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("shape", [(6,), (2, 3, 2, 2, 2)], ids=["1d", "5d"])
def test_wrong_number_of_dimensions_raises_value_error_naming_both_shapes(shape, rng):
    layer = trained_layer(rng)
    before = state(layer)
    x = rng.normal(size=shape)
    with pytest.raises(ValueError, match=rf"\(N, 3\).*{re_shape(shape)}"):
        layer(x)
    with pytest.raises(ValueError, match=re_shape(shape)):
        bnp.batch_norm_forward(x, np.ones(3), np.zeros(3))
    assert_same_state(before, state(layer))


@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count_raises_value_error_naming_both_shapes(training, rng):
    layer = trained_layer(rng).train(training)
    before = state(layer)
    x = rng.normal(size=(4, 5))
    with pytest.raises(ValueError, match=r"\(N, 3\).*\(4, 5\)"):
        layer(x)
    with pytest.raises(ValueError, match=r"\(5,\).*\(4, 5\).*\(3,\)"):
        bnp.batch_norm_forward(x, np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(3,\)"):
        bnp.batch_norm_inference(x, np.zeros(3), np.ones(3), None, None)
    assert_same_state(before, state(layer))


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training_raises_value_error(shape, rng):
    layer = trained_layer(rng)
    before = state(layer)
    x = rng.normal(size=shape)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnp.batch_norm_forward(x, None, None)
    with pytest.raises(ValueError):  # torch agrees
        torch_layer(len(shape), 3)(torch.tensor(x))
    assert_same_state(before, state(layer))  # (torch itself would have counted the batch)
    # without running statistics, eval mode uses the batch too, so it refuses as well
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnp.BatchNorm(3, track_running_stats=False).eval()(x)
    with pytest.raises(ValueError):
        torch_layer(len(shape), 3, track_running_stats=False).eval()(torch.tensor(x))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_integer_input_raises_type_error(dtype, rng):
    layer = trained_layer(rng)
    before = state(layer)
    x = np.ones((4, 3), dtype=dtype)
    for call in [layer, lambda x: bnp.batch_norm_forward(x, None, None),
                 lambda x: bnp.batch_norm_inference(x, np.zeros(3), np.ones(3), None, None)]:
        with pytest.raises(TypeError, match="floating"):
            call(x)
    assert_same_state(before, state(layer))


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_non_positive_eps_raises_value_error(eps, rng):
    with pytest.raises(ValueError, match="eps"):
        bnp.BatchNorm(3, eps=eps)
    x = rng.normal(size=(4, 3))
    with pytest.raises(ValueError, match="eps"):
        bnp.batch_norm_forward(x, None, None, eps=eps)
    with pytest.raises(ValueError, match="eps"):
        bnp.batch_norm_inference(x, np.zeros(3), np.ones(3), None, None, eps=eps)
    layer = trained_layer(rng)
    layer.eps = eps  # changed after construction: still caught before any update
    before = state(layer)
    with pytest.raises(ValueError, match="eps"):
        layer(x)
    assert_same_state(before, state(layer))


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_momentum_outside_unit_interval_raises_value_error(momentum, rng):
    with pytest.raises(ValueError, match="momentum"):
        bnp.BatchNorm(3, momentum=momentum)
    with pytest.raises(ValueError, match="momentum"):
        bnp.ema_update(np.zeros(3), np.ones(3), momentum)
    layer = trained_layer(rng)
    layer.momentum = momentum
    before = state(layer)
    with pytest.raises(ValueError, match="momentum"):
        layer(rng.normal(size=(4, 3)))
    assert_same_state(before, state(layer))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_input_propagates_to_output_but_never_into_running_statistics(bad, rng):
    layer = trained_layer(rng)
    before = state(layer)
    x = batch(rng, (8, 3))
    x[3, 1] = bad
    with pytest.warns(RuntimeWarning, match="left unchanged"):
        y = layer(x)
    assert np.isnan(y[:, 1]).all()
    # the other channels are normalized as torch does it
    expected = F.batch_norm(torch.tensor(x), None, None, training=True).numpy()
    np.testing.assert_allclose(y[:, [0, 2]], expected[:, [0, 2]], rtol=1e-12)
    assert_same_state(before, state(layer))
    assert np.isfinite(layer.eval()(batch(rng, (8, 3)))).all()  # eval mode still works


@pytest.mark.parametrize(("dtype", "offset", "atol"), [(np.float64, 1e8, 1e-6),
                                                       (np.float32, 1e4, 5e-3)])
def test_large_offset_does_not_destroy_the_statistics(dtype, offset, atol, rng):
    x = (offset + batch(rng, (256, 3, 4))).astype(dtype)
    # the oracle sees the same numbers moved back to 0 (x - offset is exact), in float64
    centered = torch.tensor(x.astype(np.float64) - offset)
    theirs = torch.nn.BatchNorm1d(3, momentum=1.0).double()
    layer = bnp.BatchNorm(3, momentum=1.0)
    np.testing.assert_allclose(layer(x), theirs(centered).detach().numpy(), atol=atol)
    np.testing.assert_allclose(layer.running_var, theirs.running_var.numpy(), rtol=atol)
    np.testing.assert_allclose(layer.running_mean - offset, theirs.running_mean.numpy(),
                               atol=atol)
