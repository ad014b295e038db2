"""Batch normalization in NumPy: the course's reference implementation.

Shapes follow ``torch.nn.BatchNorm1d`` / ``BatchNorm2d``. The channel axis is 1 and the
statistics of a channel are taken over every other axis, so one code path serves

=================  ===========================================
``(N, C)``         a batch of feature vectors (after a Linear)
``(N, C, L)``      a batch of sequences
``(N, C, H, W)``   a batch of images (after a Conv)
=================  ===========================================

and every per-channel vector (``gamma``, ``beta``, ``running_mean``, ``running_var``) has
shape ``(C,)``. With ``m = N*L`` (or ``N*H*W``) values per channel, training mode computes

    mu = mean(x),   var = mean((x - mu)**2)        (the biased variance, over the m values)
    x_hat = (x - mu) / sqrt(var + eps)
    y = gamma * x_hat + beta

and updates the running statistics with the UNBIASED variance ``var * m / (m - 1)``:
``running = (1 - momentum) * running + momentum * batch_stat``. Eval mode uses the running
statistics instead of ``mu`` and ``var``.

Statistics are accumulated in float64 and computed in two passes (mean first, then the mean
of squared deviations), so a large common offset does not cancel them away. Elementwise
work runs in the input's precision, at least float32; outputs come back in the input dtype.

Where this module deliberately differs from torch:

- bad input raises before any state changes (torch counts ``num_batches_tracked`` before it
  rejects a batch with one value per channel);
- a training batch with a non-finite statistic (NaN or inf in the input) still gives its
  output, NaN included, but leaves ``running_mean``, ``running_var`` and
  ``num_batches_tracked`` exactly as they were and warns; torch would write NaN into the
  buffers, and every later eval-mode output would be NaN;
- ``eps`` must be > 0 everywhere (torch accepts 0 in eval mode) and ``momentum`` must lie
  in [0, 1];
- ``BatchNorm.backward`` overwrites ``dgamma`` and ``dbeta``; torch accumulates ``.grad``.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

__all__ = [
    "BatchNorm",
    "NotFittedError",
    "Standardizer",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "ema_update",
    "fold_batch_norm",
    "group_norm_backward",
    "group_norm_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "numerical_gradient",
    "rel_error",
]

# What a forward function hands to its backward: a dict of arrays and flags (see _normalize,
# layer_norm_forward and group_norm_forward).
Cache = dict[str, Any]


# --- checks and shape helpers ------------------------------------------------------------


def _check_eps(eps: float) -> None:
    if not eps > 0:  # written this way round so that NaN is rejected too
        raise ValueError(f"eps must be > 0 (it keeps 1/sqrt(var + eps) finite), got {eps!r}")


def _check_momentum(momentum: float) -> None:
    if not 0 <= momentum <= 1:
        raise ValueError(
            "momentum must lie in [0, 1] (PyTorch's convention: the weight of the new batch "
            f"statistic), got {momentum!r}"
        )


def _check_input(x: ArrayLike, num_channels: int | None = None, against: str = "") -> np.ndarray:
    """Return x as an array: floating point, 2-, 3- or 4-d, with num_channels on axis 1."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"batch norm needs floating-point input (float16, float32 or float64), got dtype "
            f"{x.dtype}; convert it first, e.g. x.astype(np.float64)"
        )
    if x.ndim not in (2, 3, 4) or (num_channels is not None and x.shape[1] != num_channels):
        c = "C" if num_channels is None else num_channels
        raise ValueError(
            f"expected input of shape (N, {c}), (N, {c}, L) or (N, {c}, H, W){against}, "
            f"got shape {x.shape}"
        )
    return x


def _check_affine(name: str, v: ArrayLike | None, shape: tuple[int, ...],
                  x: np.ndarray) -> np.ndarray | None:
    """Return v as an array of the given shape, or None."""
    if v is None:
        return None
    v = np.asarray(v)
    if v.shape != tuple(shape):
        raise ValueError(
            f"{name} must have shape {tuple(shape)} to match input of shape {x.shape}, "
            f"got shape {v.shape}"
        )
    return v


def _check_per_channel(name: str, v: ArrayLike | None, x: np.ndarray) -> np.ndarray | None:
    """Return v as a (C,) array, or None; C is the channel count of x."""
    return _check_affine(name, v, (x.shape[1],), x)


def _values_per_channel(shape: tuple[int, ...]) -> int:
    """m = N * L (or N * H * W): how many values each channel's statistics average over."""
    return shape[0] * math.prod(shape[2:])


def _check_batch_size(x: np.ndarray) -> None:
    if _values_per_channel(x.shape) == 1:
        # a single value has variance 0: x_hat would be 0 whatever x is, and no gradient flows
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}"
        )


def _axes(ndim: int) -> tuple[int, ...]:
    """Every axis but the channel axis 1."""
    return (0, *range(2, ndim))


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a (C,) vector so that it broadcasts along axis 1 of an ndim-d array."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _compute_dtype(dtype: DTypeLike) -> np.dtype:
    """Elementwise work runs in the input's precision, but at least float32."""
    return np.promote_types(dtype, np.float32)


# --- the functions -----------------------------------------------------------------------


def _batch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of x, both (C,) float64.

    Two passes: the mean first, then the mean of squared deviations. The one-pass
    E[x^2] - E[x]^2 subtracts two huge, nearly equal numbers when the data sit far from 0.
    """
    if _values_per_channel(x.shape) == 0:  # an empty batch has no statistics (torch: empty out)
        return np.zeros(x.shape[1]), np.zeros(x.shape[1])
    xc = x.astype(_compute_dtype(x.dtype), copy=False)
    axes = _axes(x.ndim)
    with np.errstate(invalid="ignore", over="ignore"):  # inf in x: NaN stats, flagged later
        mean = xc.mean(axis=axes, dtype=np.float64)
        deviation = xc - _channel(mean.astype(xc.dtype), x.ndim)
        var = np.square(deviation).mean(axis=axes, dtype=np.float64)
    return mean, var


def _normalize(x: np.ndarray, mean: ArrayLike, var: ArrayLike, gamma: np.ndarray | None,
               beta: np.ndarray | None, eps: float,
               batch_stats: bool) -> tuple[np.ndarray, Cache]:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, and the cache for the backward pass."""
    ct = _compute_dtype(x.dtype)
    inv_std = (1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)).astype(ct)
    mean_ct = np.asarray(mean).astype(ct)
    with np.errstate(invalid="ignore", over="ignore"):  # as torch: NaN and inf pass silently
        x_hat = (x.astype(ct, copy=False) - _channel(mean_ct, x.ndim)) * _channel(inv_std, x.ndim)
        y = x_hat
        if gamma is not None:
            y = y * _channel(gamma.astype(ct), x.ndim)
        if beta is not None:
            y = y + _channel(beta.astype(ct), x.ndim)
    if y is x_hat:  # no gamma, no beta: copy, so that changing y in place leaves the cache alone
        y = x_hat.copy()
    cache = {
        "x_hat": x_hat,  # (x - mean) / std, shaped like x: its shape is all the shape info
        "inv_std": inv_std,  # (C,) 1 / sqrt(var + eps)
        "gamma": gamma,  # (C,) or None
        "beta": beta,  # (C,) or None; only whether it exists matters to the backward
        "mean": np.asarray(mean),  # (C,) the statistics used, kept for the running averages
        "var": np.asarray(var),  # (C,)
        "batch_stats": batch_stats,  # True: mean and var were computed from x itself
        "dtype": x.dtype,
    }
    return y.astype(x.dtype, copy=False), cache


def batch_norm_forward(x: ArrayLike, gamma: ArrayLike | None, beta: ArrayLike | None,
                       eps: float = 1e-5) -> tuple[np.ndarray, Cache]:
    """Training-mode batch normalization: normalize with the statistics of this batch.

        mu_c = mean of x over every axis but 1,   var_c = mean of (x - mu_c)**2   (biased)
        y = gamma_c * (x - mu_c) / sqrt(var_c + eps) + beta_c

    Inputs:
    - x: Data of shape (N, C), (N, C, L) or (N, C, H, W); float16, float32 or float64
    - gamma: Scale parameter of shape (C,), or None (no scale, as gamma = 1)
    - beta: Shift parameter of shape (C,), or None (no shift, as beta = 0)
    - eps: Constant > 0 added to the variance for numeric stability

    Returns a tuple of:
    - y: Output shaped like x, in x's dtype
    - cache: dict for batch_norm_backward: x_hat (shaped like x), inv_std (C,), gamma, beta,
      and the batch's mean (C,) and biased var (C,)

    Raises ValueError for a wrong shape, for eps <= 0, or for one value per channel
    (N*L*H*W == 1: its variance is 0 and the output would not depend on x); TypeError for
    integer input.
    """
    _check_eps(eps)
    x = _check_input(x)
    gamma = _check_per_channel("gamma", gamma, x)
    beta = _check_per_channel("beta", beta, x)
    _check_batch_size(x)
    mean, var = _batch_stats(x)
    return _normalize(x, mean, var, gamma, beta, eps, batch_stats=True)


def batch_norm_backward(
    dy: ArrayLike, cache: Cache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Backward pass of batch normalization, in one pass over the per-channel reductions.

    With m values per channel and the sums taken over every axis but 1,

        dbeta  = sum(dy)
        dgamma = sum(dy * x_hat)
        dx     = gamma / std * (dy - dbeta / m - x_hat * dgamma / m)      (batch statistics)
        dx     = gamma / std * dy                                         (running statistics)

    The two subtracted terms are the paths through the batch mean and variance, which both
    depend on x; in eval mode the statistics are constants and only the direct path is left.

    Inputs:
    - dy: Upstream derivatives, shaped like the forward input x
    - cache: The cache returned by batch_norm_forward (or by BatchNorm.forward)

    Returns a tuple of:
    - dx: Gradient with respect to x, shaped like x, in x's dtype
    - dgamma: Gradient with respect to gamma, shape (C,); None if gamma was None
    - dbeta: Gradient with respect to beta, shape (C,); None if beta was None
    """
    x_hat, inv_std, gamma, beta = cache["x_hat"], cache["inv_std"], cache["gamma"], cache["beta"]
    dy = np.asarray(dy)
    if dy.shape != x_hat.shape:
        raise ValueError(f"dy has shape {dy.shape}, but the forward input had shape {x_hat.shape}")
    ct, nd = x_hat.dtype, x_hat.ndim
    axes = _axes(nd)
    dy = dy.astype(ct, copy=False)
    dbeta = dy.sum(axis=axes, dtype=np.float64)
    dgamma = (dy * x_hat).sum(axis=axes, dtype=np.float64)
    scale = inv_std if gamma is None else gamma.astype(ct) * inv_std  # (C,) dy -> dx, direct
    if cache["batch_stats"]:
        m = max(_values_per_channel(x_hat.shape), 1)  # max: an empty batch has empty dx
        dy_mean = _channel((dbeta / m).astype(ct), nd)
        dyx_mean = _channel((dgamma / m).astype(ct), nd)
        dx = _channel(scale, nd) * (dy - dy_mean - x_hat * dyx_mean)
    else:
        dx = _channel(scale, nd) * dy
    dgamma = None if gamma is None else dgamma.astype(np.result_type(gamma, ct))
    dbeta = None if beta is None else dbeta.astype(np.result_type(beta, ct))
    return dx.astype(cache["dtype"], copy=False), dgamma, dbeta


def batch_norm_inference(x: ArrayLike, running_mean: ArrayLike, running_var: ArrayLike,
                         gamma: ArrayLike | None, beta: ArrayLike | None,
                         eps: float = 1e-5) -> np.ndarray:
    """Eval-mode batch normalization: normalize with fixed (running) statistics.

        y = gamma_c * (x - running_mean_c) / sqrt(running_var_c + eps) + beta_c

    Each sample is transformed on its own, so the output does not depend on the batch.

    Inputs:
    - x: Data of shape (N, C), (N, C, L) or (N, C, H, W); float16, float32 or float64
    - running_mean, running_var: Statistics of shape (C,)
    - gamma, beta: Parameters of shape (C,), or None (as 1 and 0)
    - eps: Constant > 0 added to the variance

    Returns:
    - y: Output shaped like x, in x's dtype
    """
    _check_eps(eps)
    x = _check_input(x)
    mean = _check_per_channel("running_mean", running_mean, x)
    var = _check_per_channel("running_var", running_var, x)
    if mean is None or var is None:
        raise ValueError("batch_norm_inference needs running_mean and running_var, got None")
    y, _ = _normalize(x, mean, var, _check_per_channel("gamma", gamma, x),
                      _check_per_channel("beta", beta, x), eps, batch_stats=False)
    return y


def ema_update(running: ArrayLike, batch_stat: ArrayLike, momentum: float) -> np.ndarray:
    """One step of PyTorch's exponential moving average of a statistic.

        new_running = (1 - momentum) * running + momentum * batch_stat

    Note PyTorch's convention: momentum is the weight of the NEW value (0.1 by default),
    the opposite of the optimizer's momentum and of Keras' (0.99 there is 0.01 here).

    Inputs:
    - running: Current running statistic, shape (C,) (or a scalar)
    - batch_stat: This batch's statistic, same shape
    - momentum: Weight of batch_stat, in [0, 1]

    Returns:
    - new_running: A new array; running is not modified
    """
    _check_momentum(momentum)
    running, batch_stat = np.asarray(running), np.asarray(batch_stat)
    if running.shape != batch_stat.shape:
        raise ValueError(
            f"running has shape {running.shape} but batch_stat has shape {batch_stat.shape}"
        )
    return (1 - momentum) * running + momentum * batch_stat


# --- the layer ---------------------------------------------------------------------------


class BatchNorm:
    """Batch normalization layer with running statistics: torch.nn.BatchNorm1d/2d in NumPy.

        y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta

    Shapes: input (N, C), (N, C, L) or (N, C, H, W) with C = num_features; output the same.

    - training mode (the default; ``train()``): E and Var are the batch mean and biased
      variance over every axis but 1; if ``track_running_stats``, the running statistics are
      then updated with the batch mean and the UNBIASED variance (m / (m - 1) times the
      biased one, m values per channel), and ``num_batches_tracked`` counts the batch;
    - eval mode (``eval()``): E and Var are ``running_mean`` and ``running_var``;
    - ``momentum=None``: a cumulative average, weight 1 / num_batches_tracked for each batch;
    - ``track_running_stats=False``: no buffers (None) and batch statistics in both modes;
    - ``affine=False``: no gamma and beta (None, acting as 1 and 0); ``bias=False`` drops
      only beta (torch's keyword).

    Parameters gamma (ones) and beta (zeros), and buffers running_mean (zeros) and
    running_var (ones), are float64 arrays of shape (C,); ``backward(dy)`` returns dx and
    sets ``dgamma`` and ``dbeta`` (overwritten at each call, not accumulated).

    A training batch with a non-finite statistic (NaN or inf in x) gives its output, NaN
    included, but leaves running_mean, running_var and num_batches_tracked as they were,
    with a RuntimeWarning: one bad batch must not poison every later eval-mode output.
    Any bad input raises before the layer changes.
    """

    gamma: np.ndarray | None  # (C,)
    beta: np.ndarray | None  # (C,)
    running_mean: np.ndarray | None  # (C,)
    running_var: np.ndarray | None  # (C,)
    num_batches_tracked: int | None
    dgamma: np.ndarray | None  # (C,), after backward
    dbeta: np.ndarray | None  # (C,), after backward
    _cache: Cache | None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 bias: bool = True) -> None:
        num_features = operator.index(num_features)
        if num_features < 0:
            raise ValueError(f"num_features must be >= 0, got {num_features}")
        _check_eps(eps)
        if momentum is not None:
            _check_momentum(momentum)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.gamma = np.ones(num_features) if affine else None
        self.beta = np.zeros(num_features) if affine and bias else None
        if track_running_stats:
            self.running_mean = np.zeros(num_features)
            self.running_var = np.ones(num_features)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.dgamma = self.dbeta = None
        self.training = True
        self._cache = None

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats})"
        )

    def train(self, mode: bool = True) -> BatchNorm:
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        return self.train(False)

    def __call__(self, x: ArrayLike) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: ArrayLike) -> np.ndarray:
        """Normalize x of shape (N, C, ...); in training mode, also update the running stats."""
        # Every check comes before any change, so rejected input leaves the layer as it was.
        _check_eps(self.eps)
        if self.momentum is not None:
            _check_momentum(self.momentum)
        x = _check_input(x, self.num_features, f" for num_features={self.num_features}")
        # as torch: batch statistics in training mode, and in eval mode when there are no buffers
        if self.training or self.running_mean is None:
            y, cache = batch_norm_forward(x, self.gamma, self.beta, self.eps)
        else:
            mean = _check_per_channel("running_mean", self.running_mean, x)
            var = _check_per_channel("running_var", self.running_var, x)
            if mean is None or var is None:
                raise ValueError("eval mode needs running_var as well as running_mean, got None")
            gamma = _check_per_channel("gamma", self.gamma, x)
            beta = _check_per_channel("beta", self.beta, x)
            y, cache = _normalize(x, mean, var, gamma, beta, self.eps, batch_stats=False)
        if self.training and self.track_running_stats:
            self._update_running_stats(cache["mean"], cache["var"], _values_per_channel(x.shape))
        self._cache = cache
        return y

    def _update_running_stats(self, mean: np.ndarray, var: np.ndarray, m: int) -> None:
        # track_running_stats: the buffers exist
        assert self.num_batches_tracked is not None
        assert self.running_mean is not None and self.running_var is not None
        if m == 0:  # as torch: an empty batch counts, but has no statistics to average
            self.num_batches_tracked += 1
            return
        var_unbiased = var * (m / (m - 1))  # the running var estimates the population's
        if not (np.isfinite(mean).all() and np.isfinite(var_unbiased).all()):
            warnings.warn(
                "batch statistics are not finite (NaN or inf in the input): running_mean, "
                "running_var and num_batches_tracked were left unchanged",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.num_batches_tracked += 1
        if self.momentum is None:  # cumulative average: every batch so far weighs the same
            factor = 1.0 / self.num_batches_tracked
        else:
            factor = self.momentum
        # the buffers keep their dtype (float64 unless replaced)
        self.running_mean = ema_update(self.running_mean, mean, factor).astype(
            np.asarray(self.running_mean).dtype)
        self.running_var = ema_update(self.running_var, var_unbiased, factor).astype(
            np.asarray(self.running_var).dtype)

    def backward(self, dy: ArrayLike) -> np.ndarray:
        """Return dx for upstream dy (shaped like the last forward's input); set dgamma, dbeta."""
        if self._cache is None:
            raise RuntimeError("BatchNorm.backward needs a forward pass first")
        dx, self.dgamma, self.dbeta = batch_norm_backward(dy, self._cache)
        return dx


# --- deployment: folding into the previous layer -----------------------------------------


def fold_batch_norm(weight: ArrayLike, bias: ArrayLike | None,
                    bn: BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode BatchNorm into the Linear or Conv layer just before it.

    Eval-mode BN is a fixed per-channel affine map, so it merges into the layer's weights:

        s = gamma / sqrt(running_var + eps)
        weight' = s_c * weight[c]          (each output channel c scaled)
        bias'   = s * (bias - running_mean) + beta

    Inputs:
    - weight: Layer weight of shape (out, in) for a Linear or (out, in, kh, kw) for a Conv,
      with out = bn.num_features
    - bias: Layer bias of shape (out,), or None (as zeros)
    - bn: A BatchNorm in eval mode with running statistics

    Returns a tuple of:
    - weight: Folded weight, same shape and dtype as weight
    - bias: Folded bias of shape (out,), in bias's dtype (weight's if bias was None)
    """
    if bn.training:
        raise ValueError("fold_batch_norm needs an eval-mode BatchNorm: call bn.eval() first "
                         "(in training mode it normalizes with each batch's statistics)")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics "
                         "(track_running_stats=False normalizes with batch statistics)")
    _check_eps(bn.eps)
    weight = np.asarray(weight)
    if weight.ndim < 2 or weight.shape[0] != bn.num_features:
        raise ValueError(
            f"weight must have shape ({bn.num_features}, in) or ({bn.num_features}, in, kh, kw) "
            f"for num_features={bn.num_features}, got shape {weight.shape}"
        )
    out_dtype = weight.dtype if np.issubdtype(weight.dtype, np.floating) else np.float64
    if bias is None:
        bias, bias_dtype = np.zeros(bn.num_features), out_dtype
    else:
        bias = np.asarray(bias)
        if bias.shape != (bn.num_features,):
            raise ValueError(
                f"bias must have shape ({bn.num_features},) to match weight of shape "
                f"{weight.shape}, got shape {bias.shape}"
            )
        bias_dtype = bias.dtype if np.issubdtype(bias.dtype, np.floating) else np.float64
    running_var = np.asarray(bn.running_var, dtype=np.float64)
    scale = 1.0 / np.sqrt(running_var + bn.eps)
    if bn.gamma is not None:
        scale = scale * bn.gamma
    shift = 0.0 if bn.beta is None else bn.beta
    new_weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    new_bias = (bias - bn.running_mean) * scale + shift
    return new_weight.astype(out_dtype), new_bias.astype(bias_dtype)


# --- input standardization (chapter 1) ---------------------------------------------------


class NotFittedError(ValueError, AttributeError):
    """Standardizer used before fit (the same two bases as scikit-learn's NotFittedError)."""


class Standardizer:
    """Standardize features over axis 0: z = (X - mean_) / scale_, like sklearn's StandardScaler.

    - fit(X): X of shape (n_samples, n_features); sets mean_, var_ (biased), scale_
      (= sqrt(var_), or 1 for a constant feature, so that it maps to 0 and not to NaN),
      n_features_in_ and n_samples_seen_; returns self
    - transform(X), fit_transform(X), inverse_transform(Z): shape (n_samples, n_features)

    As scikit-learn: the statistics are float64, float32 data stay float32 and other data
    become float64, NaNs are ignored by fit and kept by transform, inf is rejected.
    """

    def _check(self, X: ArrayLike, fitted: bool) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(
                f"expected a 2-d array of shape (n_samples, n_features), got shape {X.shape}"
            )
        if not np.issubdtype(X.dtype, np.floating):
            X = X.astype(np.float64)
        if np.isinf(X).any():
            raise ValueError("X contains inf; standardize finite values (NaN marks missing ones)")
        if fitted:
            if not hasattr(self, "mean_"):
                raise NotFittedError(
                    "this Standardizer is not fitted yet: call fit(X_train) before transform"
                )
            if X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but the Standardizer was fitted with "
                    f"{self.n_features_in_} features"
                )
        elif X.shape[0] == 0:
            raise ValueError(f"cannot fit on 0 samples (X has shape {X.shape})")
        return X

    def fit(self, X: ArrayLike) -> Standardizer:
        X = self._check(X, fitted=False)
        mean = np.nanmean(X, axis=0, dtype=np.float64)
        # a feature whose values are all equal gets that value as its mean, exactly, so that
        # it maps to exactly 0 (the rounded mean of n copies of 0.1 need not be 0.1)
        top = np.nanmax(X, axis=0).astype(np.float64)
        mean = np.where(np.nanmin(X, axis=0) == top, top, mean)
        var = np.nanmean(np.square(X - mean), axis=0)  # two passes: stable far from 0
        n = np.sum(~np.isnan(X), axis=0)
        # constant up to rounding (scikit-learn's bound for the two-pass variance): scale 1
        eps = np.finfo(np.float64).eps
        constant = var <= n * eps * var + (n * mean * eps) ** 2
        self.mean_, self.var_ = mean, var
        self.scale_ = np.where(constant, 1.0, np.sqrt(var))
        self.n_features_in_ = X.shape[1]
        self.n_samples_seen_ = int(n[0]) if (n == n[0]).all() else n
        return self

    def transform(self, X: ArrayLike) -> np.ndarray:
        X = self._check(X, fitted=True)
        return ((X - self.mean_) / self.scale_).astype(X.dtype, copy=False)

    def fit_transform(self, X: ArrayLike) -> np.ndarray:
        return self.fit(X).transform(X)

    def inverse_transform(self, X: ArrayLike) -> np.ndarray:
        X = self._check(X, fitted=True)
        return (X * self.scale_ + self.mean_).astype(X.dtype, copy=False)


# --- gradient checking -------------------------------------------------------------------


def numerical_gradient(f: Callable[[np.ndarray], ArrayLike], x: np.ndarray, dy: ArrayLike,
                       h: float = 1e-5) -> np.ndarray:
    """Numerical gradient of sum(f(x) * dy) with respect to x, by central differences.

        dx[i] = (L(x + h e_i) - L(x - h e_i)) / (2h),   L(x) = sum(f(x) * dy)

    so dx is the vector-Jacobian product that an analytic backward(dy) should return.
    Each entry of x is perturbed in place, one at a time, and restored exactly afterwards.

    Inputs:
    - f: Function taking x and returning an array shaped like dy
    - x: Floating-point NumPy array (float64 for a meaningful check)
    - dy: Upstream derivatives, shaped like f(x)
    - h: Step size

    Returns:
    - dx: Array shaped like x
    """
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise TypeError("x must be a floating-point NumPy array (it is perturbed in place)")
    dy = np.asarray(dy, dtype=np.float64)
    grad = np.zeros_like(x)
    for ix in np.ndindex(x.shape):
        old = x[ix].copy()
        try:
            x[ix] = old + h
            plus = np.sum(np.asarray(f(x), dtype=np.float64) * dy)
            x[ix] = old - h
            minus = np.sum(np.asarray(f(x), dtype=np.float64) * dy)
        finally:
            x[ix] = old
        grad[ix] = (plus - minus) / (2 * h)
    return grad


def rel_error(a: ArrayLike, b: ArrayLike) -> float:
    """Largest elementwise relative error, max |a - b| / max(1e-8, |a| + |b|) (CS231n's).

    In float64 a correct gradient gives about 1e-7 or less; 1e-2 and up means a bug.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a has shape {a.shape} but b has shape {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


# --- beyond the batch: layer norm and group norm (chapter 6) -----------------------------
#
# Both normalize each example on its own, so neither depends on the batch: the same formulas
# serve training and evaluation, and there are no running statistics. They share one core:
# view the input as (N, G, M), G groups of M values per example, and normalize each group.


def _check_example_input(x: ArrayLike, what: str) -> np.ndarray:
    """Return x as a floating-point array of shape (N, ...) with at least 2 dimensions."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"{what} needs floating-point input (float16, float32 or float64), got dtype "
            f"{x.dtype}; convert it first, e.g. x.astype(np.float64)"
        )
    if x.ndim < 2:
        raise ValueError(
            f"{what} expects input of shape (N, D, ...) with at least 2 dimensions (one example "
            f"per row), got shape {x.shape}"
        )
    return x


def _normalize_groups(xg: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """x_hat and 1/std of every group: xg (N, G, M) -> x_hat (N, G, M), inv_std (N, G).

    Two passes in float64 for the statistics (mean, then mean squared deviation, biased);
    x_hat in xg's dtype. A group of no values (M == 0) has no statistics: mean 0, var 0.
    """
    if xg.shape[2] == 0:
        var = np.zeros(xg.shape[:2])
        deviation = np.zeros_like(xg)
    else:
        with np.errstate(invalid="ignore", over="ignore"):  # inf in x: NaN, as torch
            mean = xg.mean(axis=2, dtype=np.float64)
            deviation = xg - mean[..., None].astype(xg.dtype)
            var = np.square(deviation).mean(axis=2, dtype=np.float64)
    inv_std = (1.0 / np.sqrt(var + eps)).astype(xg.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        x_hat = deviation * inv_std[..., None]
    return x_hat, inv_std


def _normalize_groups_backward(dx_hat: np.ndarray, x_hat: np.ndarray,
                               inv_std: np.ndarray) -> np.ndarray:
    """dx from dL/dx_hat, all (N, G, M), through the statistics of each group:

        dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)),

    the means taken over the M values of a group (batch norm's formula, with a group of one
    example in place of a channel of the batch).
    """
    if x_hat.shape[2] == 0:
        return np.zeros_like(x_hat)
    ct = x_hat.dtype
    mean_d = dx_hat.mean(axis=2, keepdims=True, dtype=np.float64).astype(ct)
    mean_dx = (dx_hat * x_hat).mean(axis=2, keepdims=True, dtype=np.float64).astype(ct)
    return inv_std[..., None] * (dx_hat - mean_d - x_hat * mean_dx)


def _check_cache_kind(cache: Cache, kind: str, dy: ArrayLike) -> np.ndarray:
    if cache.get("kind") != kind:
        source = f"{cache['kind']}_forward" if "kind" in cache else "another forward pass"
        raise ValueError(f"this cache comes from {source}, not from {kind}_forward")
    dy = np.asarray(dy)
    if dy.shape != cache["shape"]:
        raise ValueError(
            f"dy has shape {dy.shape}, but the forward input had shape {cache['shape']}"
        )
    return dy.astype(cache["x_hat"].dtype, copy=False)


def layer_norm_forward(x: ArrayLike, gamma: ArrayLike | None, beta: ArrayLike | None,
                       eps: float = 1e-5) -> tuple[np.ndarray, Cache]:
    """Layer normalization: normalize every example over all its values.

        mu_n = mean of x[n],   var_n = mean of (x[n] - mu_n)**2          (biased)
        y[n] = gamma * (x[n] - mu_n) / sqrt(var_n + eps) + beta

    The same as ``torch.nn.functional.layer_norm(x, x.shape[1:], gamma, beta, eps)``. The
    statistics come from one example, never from the batch: training and evaluation agree.

    Inputs:
    - x: Data of shape (N, D) or (N, C, H, W), or any (N, ...) with at least 2 dimensions;
      float16, float32 or float64
    - gamma: Scale of shape x.shape[1:] (one per value of an example), or None (as 1)
    - beta: Shift of shape x.shape[1:], or None (as 0)
    - eps: Constant > 0 added to the variance

    Returns a tuple of:
    - y: Output shaped like x, in x's dtype
    - cache: dict for layer_norm_backward

    Raises TypeError for integer input; ValueError for fewer than 2 dimensions, a gamma or
    beta of another shape, or eps <= 0. As torch, an example of one value gives y = beta.
    """
    _check_eps(eps)
    x = _check_example_input(x, "layer_norm_forward")
    gamma = _check_affine("gamma", gamma, x.shape[1:], x)
    beta = _check_affine("beta", beta, x.shape[1:], x)
    ct = _compute_dtype(x.dtype)
    per_example = math.prod(x.shape[1:])
    xg = x.astype(ct, copy=False).reshape(x.shape[0], 1, per_example)
    x_hat, inv_std = _normalize_groups(xg, eps)
    x_hat = x_hat.reshape(x.shape)
    y = x_hat * gamma.astype(ct) if gamma is not None else x_hat.copy()
    if beta is not None:
        y = y + beta.astype(ct)
    cache = {"kind": "layer_norm", "x_hat": x_hat, "inv_std": inv_std, "gamma": gamma,
             "beta": beta, "shape": x.shape, "dtype": x.dtype}
    return y.astype(x.dtype, copy=False), cache


def layer_norm_backward(
    dy: ArrayLike, cache: Cache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Backward pass of layer normalization.

        dbeta  = sum over n of dy[n]                 (shape x.shape[1:])
        dgamma = sum over n of dy[n] * x_hat[n]
        dx[n]  = inv_std_n * (g - mean(g) - x_hat[n] * mean(g * x_hat[n])),  g = gamma * dy[n]

    with the means over the values of example n.

    Inputs:
    - dy: Upstream derivatives, shaped like the forward input x
    - cache: The cache returned by layer_norm_forward

    Returns a tuple of:
    - dx: Gradient with respect to x, shaped like x, in x's dtype
    - dgamma: Gradient with respect to gamma, shape x.shape[1:]; None if gamma was None
    - dbeta: Gradient with respect to beta, shape x.shape[1:]; None if beta was None
    """
    dy = _check_cache_kind(cache, "layer_norm", dy)
    x_hat, gamma, beta = cache["x_hat"], cache["gamma"], cache["beta"]
    ct, shape = x_hat.dtype, cache["shape"]
    grouped = (shape[0], 1, math.prod(shape[1:]))
    dx_hat = dy if gamma is None else dy * gamma.astype(ct)
    dx = _normalize_groups_backward(dx_hat.reshape(grouped), x_hat.reshape(grouped),
                                    cache["inv_std"])
    dgamma = dbeta = None
    if gamma is not None:
        dgamma = (dy * x_hat).sum(axis=0, dtype=np.float64).astype(np.result_type(gamma, ct))
    if beta is not None:
        dbeta = dy.sum(axis=0, dtype=np.float64).astype(np.result_type(beta, ct))
    return dx.reshape(cache["shape"]).astype(cache["dtype"], copy=False), dgamma, dbeta


def group_norm_forward(x: ArrayLike, gamma: ArrayLike | None, beta: ArrayLike | None,
                       num_groups: int, eps: float = 1e-5) -> tuple[np.ndarray, Cache]:
    """Group normalization: split the C channels of every example into num_groups groups of
    C / num_groups consecutive channels, and normalize each group over its channels and
    positions.

        for example n and group g (channels c in g, and every position):
        mu_ng = mean of x[n, c, ...],   var_ng = mean of (x[n, c, ...] - mu_ng)**2   (biased)
        y[n, c] = gamma_c * (x[n, c] - mu_ng) / sqrt(var_ng + eps) + beta_c

    The same as ``torch.nn.functional.group_norm(x, num_groups, gamma, beta, eps)``.
    num_groups = 1 is layer norm with one gamma per channel; num_groups = C is instance norm
    (each channel of each example normalized over its positions).

    Inputs:
    - x: Data of shape (N, C), (N, C, L) or (N, C, H, W) (any (N, C, ...)); float16, float32
      or float64
    - gamma: Scale of shape (C,), or None (as 1)
    - beta: Shift of shape (C,), or None (as 0)
    - num_groups: Number of groups G >= 1; must divide C
    - eps: Constant > 0 added to the variance

    Returns a tuple of:
    - y: Output shaped like x, in x's dtype
    - cache: dict for group_norm_backward

    Raises TypeError for integer input or a num_groups that is not an integer; ValueError for
    fewer than 2 dimensions, num_groups < 1 or not dividing C, gamma or beta not of shape
    (C,), or eps <= 0.
    """
    _check_eps(eps)
    x = _check_example_input(x, "group_norm_forward")
    num_groups = operator.index(num_groups)
    c = x.shape[1]
    if num_groups < 1 or c % num_groups:
        raise ValueError(
            f"num_groups must be a positive divisor of the number of channels C = {c} "
            f"(input of shape {x.shape}), got num_groups={num_groups}"
        )
    gamma = _check_affine("gamma", gamma, (c,), x)
    beta = _check_affine("beta", beta, (c,), x)
    ct = _compute_dtype(x.dtype)
    grouped = (x.shape[0], num_groups, math.prod(x.shape[1:]) // num_groups)
    xg = x.astype(ct, copy=False).reshape(grouped)
    x_hat, inv_std = _normalize_groups(xg, eps)
    x_hat = x_hat.reshape(x.shape)
    y = x_hat * _channel(gamma.astype(ct), x.ndim) if gamma is not None else x_hat.copy()
    if beta is not None:
        y = y + _channel(beta.astype(ct), x.ndim)
    cache = {"kind": "group_norm", "x_hat": x_hat, "inv_std": inv_std, "gamma": gamma,
             "beta": beta, "num_groups": num_groups, "shape": x.shape, "dtype": x.dtype}
    return y.astype(x.dtype, copy=False), cache


def group_norm_backward(
    dy: ArrayLike, cache: Cache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Backward pass of group normalization.

        dbeta_c  = sum of dy[:, c]              over the examples and positions
        dgamma_c = sum of dy[:, c] * x_hat[:, c]
        dx       = inv_std_ng * (g - mean(g) - x_hat * mean(g * x_hat)),   g = gamma_c * dy

    with the means over the values of group g of example n.

    Inputs:
    - dy: Upstream derivatives, shaped like the forward input x
    - cache: The cache returned by group_norm_forward

    Returns a tuple of:
    - dx: Gradient with respect to x, shaped like x, in x's dtype
    - dgamma: Gradient with respect to gamma, shape (C,); None if gamma was None
    - dbeta: Gradient with respect to beta, shape (C,); None if beta was None
    """
    dy = _check_cache_kind(cache, "group_norm", dy)
    x_hat, gamma, beta = cache["x_hat"], cache["gamma"], cache["beta"]
    ct, nd, shape = x_hat.dtype, x_hat.ndim, cache["shape"]
    grouped = (shape[0], cache["num_groups"], math.prod(shape[1:]) // cache["num_groups"])
    dx_hat = dy if gamma is None else dy * _channel(gamma.astype(ct), nd)
    dx = _normalize_groups_backward(dx_hat.reshape(grouped), x_hat.reshape(grouped),
                                    cache["inv_std"])
    axes = _axes(nd)
    dgamma = dbeta = None
    if gamma is not None:
        dgamma = (dy * x_hat).sum(axis=axes, dtype=np.float64).astype(np.result_type(gamma, ct))
    if beta is not None:
        dbeta = dy.sum(axis=axes, dtype=np.float64).astype(np.result_type(beta, ct))
    return dx.reshape(cache["shape"]).astype(cache["dtype"], copy=False), dgamma, dbeta
