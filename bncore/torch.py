r"""Batch normalization for PyTorch, written out: a drop-in for ``torch.nn.BatchNorm1d/2d``.

Every channel ``c`` of the input is normalized with statistics taken over every other axis
(the batch axis and, for 3-d and 4-d input, the length or height and width axes):

.. math::

    \mu_c = \frac{1}{M} \sum_i x_{ic}, \qquad
    \sigma^2_c = \frac{1}{M} \sum_i (x_{ic} - \mu_c)^2, \qquad
    \hat{x}_{ic} = \frac{x_{ic} - \mu_c}{\sqrt{\sigma^2_c + \epsilon}}, \qquad
    y_{ic} = \gamma_c \hat{x}_{ic} + \beta_c,

where ``i`` runs over the ``M`` values of channel ``c`` (``M = N``, ``N L`` or ``N H W``).
The backward pass is the compact analytic one, with ``g = 1 / sqrt(var + eps)``:

.. math::

    \frac{\partial L}{\partial x_{ic}} = \frac{\gamma_c g_c}{M} \Big( M\,dy_{ic}
        - \sum_j dy_{jc} - \hat{x}_{ic} \sum_j dy_{jc} \hat{x}_{jc} \Big), \qquad
    \frac{\partial L}{\partial \gamma_c} = \sum_i dy_{ic} \hat{x}_{ic}, \qquad
    \frac{\partial L}{\partial \beta_c} = \sum_i dy_{ic}.

In training mode the running statistics follow PyTorch's convention,
``running = (1 - momentum) * running + momentum * batch_stat``, with the *unbiased* batch
variance ``M / (M - 1) * var`` in ``running_var``; ``momentum=None`` gives a cumulative average.
In evaluation mode the running statistics replace the batch statistics.

Shapes:

============  ====================  ========================================
module        input                 statistics taken over
============  ====================  ========================================
BatchNorm1d   (N, C) or (N, C, L)   N, or N and L
BatchNorm2d   (N, C, H, W)          N, H and W
batch_norm    (N, C, *)             every axis but 1
============  ====================  ========================================

The output has the shape, dtype and memory format of the input. Statistics are computed in
float32 for float16 and bfloat16 input (float64 stays float64) from the deviations from a
mean, so that a large offset does not cancel them, as it would in the one-pass
``E[x^2] - E[x]^2``.

Where this module differs from PyTorch, on purpose:

- a bad input raises before anything changes (PyTorch's modules advance
  ``num_batches_tracked`` before they check the batch): wrong ndim or channel count and
  ``eps <= 0`` raise ``ValueError`` (PyTorch: ``RuntimeError`` for the channels, and
  ``eps = 0`` is accepted in evaluation), integer input ``TypeError``;
- a training step whose batch mean or variance is not finite (NaN or inf in the input)
  still propagates the NaN to the output, but leaves ``running_mean``, ``running_var`` and
  ``num_batches_tracked`` exactly as they were; PyTorch would write the NaN into the
  running statistics, and every later evaluation would return NaN. The check runs on the
  device, so it costs no host synchronization;
- double backward is not supported (the backward is marked ``once_differentiable``).

Two paths compute the same thing:

- the plain path, a few PyTorch operations on the input seen with its channels last, so that
  (C,) vectors broadcast with no reshaping: the mean (accumulated in float64), the mean of the
  squared deviations, then ``(x - mean) * scale + bias``; the backward from
  ``x_hat = (x - mean) * invstd`` and two sums. A training step dispatches under 30 aten
  operations, since a small batch costs what its operations cost to dispatch. Large CPU input
  goes block by block instead, so that the centred values live in cache rather than in
  full-size temporaries;
- on CUDA, when Triton is installed, the fused kernels of :mod:`bncore._triton`: a training
  step in three to five launches, the running statistics updated in the kernel that
  finalizes the batch statistics. Set ``bncore.torch.use_fused = False`` to force the plain
  path, which is their reference.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.types import Device

__all__ = ["BatchNormFunction", "batch_norm", "BatchNorm1d", "BatchNorm2d"]

#: Use the fused Triton kernels on CUDA when Triton is installed (the plain path otherwise).
use_fused = True

# On CPU, input larger than this goes block by block, each block at most this many elements:
# small enough that a block and its temporaries stay in cache, and just below ATen's parallel
# grain size (32768), so that each operation on a block runs on one thread. Hundreds of tiny
# parallel regions cost more than they gain, and far more on a machine that is shared.
_BLOCK_ELEMENTS = 32767
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INF = torch.tensor(math.inf)  # compared with as a tensor: cheaper than a Python float
# What the plain forward saves for its backward: (x seen channels last, mean, invstd, scale).
_Saved = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------
# Checks: every bad input is rejected here, before any state changes.
# ----------------------------------------------------------------------------------------


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def _check_args(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    nbt: torch.Tensor | None,
) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm expects a torch.Tensor input, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(
            f"batch_norm expects floating-point input, got {input.dtype}; "
            "convert it first, e.g. input.float()"
        )
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expects input of shape (N, C, *) with at least 2 dimensions, "
            f"got input of shape {_shape(input)}"
        )
    channels = input.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and t.shape != (channels,):
            raise ValueError(
                f"input of shape {_shape(input)} has {channels} channels (axis 1), "
                f"but {name} has shape {_shape(t)}; expected ({channels},)"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        # The same exception type as torch.nn.functional.batch_norm.
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training and input.numel() // max(channels, 1) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input of shape "
            f"{_shape(input)}"
        )
    if not eps > 0:
        raise ValueError(f"batch_norm eps must be positive, got {eps}")
    if momentum is None and nbt is None:
        raise TypeError(
            "momentum must be a float; momentum=None (a cumulative average) needs "
            "num_batches_tracked, which only the modules keep"
        )


# ----------------------------------------------------------------------------------------
# The plain path: a few PyTorch operations on the input seen with its channels last.
# ----------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *) seen as (N, *, C), a view: a (C,) vector then broadcasts along the channels
    with no reshaping. 2-d input already has its channels last."""
    return t if t.dim() == 2 else t.movedim(1, -1)


def _channels_first(t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_channels_last`."""
    return t if t.dim() == 2 else t.movedim(-1, 1)


def _all_but_last(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(t.dim() - 1))


def _batch_statistics(
    x: torch.Tensor, xt: torch.Tensor, cdtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-channel mean and biased variance of ``x`` (N, C, *), both (C,) in ``cdtype``, and
    the deviations ``x - mean`` seen channels last, or None where they were not kept.

    Two passes: the mean, accumulated in float64 as PyTorch's CPU kernel does, then the mean
    of the squared deviations from it. Subtracting the mean first keeps an offset from
    cancelling the variance, as it would in the one-pass ``E[x^2] - E[x]^2``. Large input on
    the CPU goes block by block (:func:`_blocked_statistics`). ``xt`` is x seen channels last.
    """
    if _in_blocks(x):
        return (*_blocked_statistics(x), None)
    channels = xt.shape[-1]
    if xt.numel() == 0:  # an empty batch: statistics that change nothing
        return xt.new_zeros(channels, dtype=cdtype), xt.new_ones(channels, dtype=cdtype), None
    dims = _all_but_last(xt)
    mean = xt.mean(dims, dtype=torch.float64).to(cdtype)
    xc = xt - mean
    return mean, (xc * xc).mean(dims), xc


def _plain_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    nbt: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
) -> tuple[torch.Tensor, _Saved]:
    """``y`` and what the backward needs: (x seen channels last, mean, invstd, scale)."""
    cdtype = _compute_dtype(x.dtype)
    xt = _channels_last(x)
    if training:
        mean, var, xc = _batch_statistics(x, xt, cdtype)
        _update_running_stats(running_mean, running_var, nbt, mean, var,
                              x.numel() // max(x.shape[1], 1), momentum)
    else:  # a copy: the saved mean must not change if the buffer does before backward
        assert running_mean is not None and running_var is not None  # by _check_args
        mean, var, xc = running_mean.to(cdtype, copy=True), running_var.to(cdtype), None
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(cdtype)
    out = None if x.dtype == cdtype else torch.empty_like(xt)  # rounded once, at the end
    if xc is None:  # x * scale + (bias - mean * scale): one pass over x, as PyTorch's kernel
        if bias is None:
            shift = (mean * scale).neg_()
        else:
            shift = torch.addcmul(bias.to(cdtype), mean, scale, value=-1)
        y = torch.addcmul(shift, xt, scale, out=out)
    elif bias is None:  # (x - mean) * scale (+ bias), from the deviations already made
        y = torch.mul(xc, scale, out=out)
    else:
        y = torch.addcmul(bias.to(cdtype), xc, scale, out=out)
    return _channels_first(y), (xt, mean, invstd, scale)


def _plain_backward(
    dy: torch.Tensor, saved: _Saved, training: bool, need_input: bool, need_sums: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, sum(dy * x_hat), sum(dy))`` per channel; what is not needed is None.

    ``saved`` is what :func:`_plain_forward` returned beside ``y``.
    """
    xt, mean, invstd, scale = saved
    count = xt.numel() // max(xt.shape[-1], 1)
    dyt = _channels_last(dy)
    dx: torch.Tensor | None = None
    sum_dy: torch.Tensor | None = None
    sum_dy_xhat: torch.Tensor | None = None
    x_hat: torch.Tensor | None = None
    if training or need_sums:
        if _in_blocks(xt):  # large CPU input: block by block, no full-size temporaries
            sum_dy, sum_dy_xc = _centered_sums(_channels_first(xt), mean, dy)
            sum_dy_xhat = sum_dy_xc * invstd
        else:
            dims = _all_but_last(xt)
            x_hat = (xt - mean).mul_(invstd)
            sum_dy = dyt.sum(dims, dtype=mean.dtype)
            sum_dy_xhat = (dyt * x_hat).sum(dims)
    if need_input:
        if not training:  # evaluation: the statistics are constants
            dx = _channels_first(dyt * scale)
        else:
            assert sum_dy is not None and sum_dy_xhat is not None  # made above in training
            if x_hat is not None:
                # dx = scale * (dy - (sum(dy) + x_hat * sum(dy * x_hat)) / M)
                u = torch.addcmul(sum_dy, x_hat, sum_dy_xhat)
                dx = _channels_first(torch.sub(dyt, u, alpha=1 / count).mul_(scale))
            else:  # the same, as (x - mean) * b + d + dy * scale in two passes over x and dy
                b = scale * invstd * sum_dy_xhat / -count
                d = scale * sum_dy / -count
                dx = _affine_centered(_channels_first(xt), mean, b, d, dy, scale)
        dx = dx.to(xt.dtype)
    return dx, sum_dy_xhat, sum_dy


# Large CPU input: the sums of the statistics and of the backward run block by block, so that
# the centred values ``x - mean`` live in cache instead of in a full-size temporary.


def _in_blocks(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() > _BLOCK_ELEMENTS


def _channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor reshaped to broadcast along axis 1 of ``like``: (1, C, 1, ...)."""
    return t.view((1, -1) + (1,) * (like.dim() - 2))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _blocks(x: torch.Tensor) -> list[tuple[tuple[slice, ...], slice]]:
    """Cut x into blocks of at most _BLOCK_ELEMENTS: (index of the block, its channels).

    A block is a few whole samples when a sample is small enough, else a piece of one sample
    cut along the axis that keeps it contiguous in memory: the channels (axis 1) of a
    contiguous tensor, the rows (axis 2) of a channels_last one. Off the CPU: all of x.
    """
    every = slice(None)
    if x.device.type != "cpu" or x.numel() <= _BLOCK_ELEMENTS:
        return [((every,), every)]
    n, sample = x.shape[0], x[0].numel()
    if sample <= _BLOCK_ELEMENTS:
        rows = _BLOCK_ELEMENTS // sample
        return [((slice(i, i + rows),), every) for i in range(0, n, rows)]
    axis = 2 if x.dim() > 2 and x.stride(1) == 1 else 1
    size = x.shape[axis]
    step = max(1, _BLOCK_ELEMENTS // (sample // size))
    blocks: list[tuple[tuple[slice, ...], slice]] = []
    for i in range(n):
        for j in range(0, size, step):
            cut = slice(j, j + step)
            if axis == 1:
                blocks.append(((slice(i, i + 1), cut), cut))
            else:
                blocks.append(((slice(i, i + 1), every, cut), every))
    return blocks


def _channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean, shape (C,), accumulated in the compute dtype."""
    return x.mean(_reduce_dims(x), dtype=_compute_dtype(x.dtype))


def _centered_sums(
    x: torch.Tensor, mean: torch.Tensor, dy: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sums over every axis but 1, with ``xc = x - mean``.

    Without ``dy``: ``(sum(xc), sum(xc * xc))``. With ``dy``: ``(sum(dy), sum(dy * xc))``.
    """
    dims, m = _reduce_dims(x), _channel_view(mean, x)
    first = torch.zeros_like(mean)
    second = torch.zeros_like(mean)
    for index, c in _blocks(x):
        xc = x[index] - m[:, c]  # a block-sized temporary in the compute dtype
        d = xc if dy is None else dy[index]
        first[c] += d.sum(dims, dtype=mean.dtype)
        second[c] += xc.mul_(d).sum(dims)
    return first, second


def _blocked_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_batch_statistics` block by block: a first mean, then the centred sums."""
    count = x.numel() // x.shape[1]
    mean = _channel_mean(x)
    sum_xc, sum_xc2 = _centered_sums(x, mean)
    mean_deviation = sum_xc / count
    return mean + mean_deviation, sum_xc2 / count - mean_deviation * mean_deviation


def _affine_centered(
    x: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    dy: torch.Tensor | None = None,
    dy_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x - mean) * scale + shift`` (``+ dy * dy_scale``), per channel, in the compute dtype.

    Computed as ``x * scale + (shift - mean * scale)`` in one pass over x, as PyTorch's kernel
    does. Its rounding error, about ``eps * |x| / std`` relative to the output, is that of the
    float x itself: with an offset of 1e4 and std 1 in float32, 1e-3 of the output's unit.
    """
    s, b = _channel_view(scale, x), _channel_view(shift - mean * scale, x)
    out = torch.addcmul(b, x, s)
    if dy is None:
        return out
    assert dy_scale is not None  # given with dy
    return out.addcmul_(dy, _channel_view(dy_scale, x))


# ----------------------------------------------------------------------------------------
# Running statistics: updated on the device, and only when the batch statistics are finite.
# ----------------------------------------------------------------------------------------


def _update_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    nbt: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float | None,
) -> None:
    """Move the running statistics towards the batch's, on the device, with no host sync.

    ``running += momentum * (batch_stat - running)`` with the unbiased batch variance, and
    ``num_batches_tracked += 1``, unless the batch statistics are not finite: then nothing
    changes. An empty batch (``count == 0``) counts, as in PyTorch, but changes no statistic.
    """
    if count == 0:
        if nbt is not None:
            nbt.add_(1)
        return
    unbiased_var = var * (count / (count - 1))
    # The largest variance is below +inf and not NaN (max propagates NaN): a variance is never
    # -inf. It is computed from the deviations from the mean, so a mean that is not finite
    # makes it NaN: checking the variance checks both.
    finite = unbiased_var.max() < _INF  # 0-d, stays on the device
    if nbt is not None:
        nbt.add_(finite)
    if running_mean is None:
        return
    assert running_var is not None  # both or neither, by _check_args
    factor: float | torch.Tensor  # the weight of the batch's value
    if momentum is None:  # cumulative average: 1 / (number of finite batches so far)
        assert nbt is not None  # by _check_args
        factor = nbt.to(mean.dtype).clamp_(min=1).reciprocal_()
    else:
        factor = momentum
    for running, stat in ((running_mean, mean), (running_var, unbiased_var)):
        # Towards the batch's value when finite, else towards itself: no change, exactly.
        if running.dtype == stat.dtype:
            running.lerp_(torch.where(finite, stat, running), factor)
        else:
            wide = running.to(stat.dtype)
            running.copy_(wide.lerp_(torch.where(finite, stat, wide), factor))


# ----------------------------------------------------------------------------------------
# The fused Triton kernels, for CUDA input when Triton is installed.
# ----------------------------------------------------------------------------------------

# bncore._triton once imported; False where Triton is not installed.
_triton_module: ModuleType | Literal[False] | None = None
_FUSED_DEVICE = "cuda"  # the tests set "cpu" to run the kernels in Triton's interpreter


def _fused_kernels(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    nbt: torch.Tensor | None,
) -> ModuleType | None:
    """:mod:`bncore._triton` when this call can use it, else None (the plain path).

    It can for CUDA input in float32, float16 or bfloat16, with parameters and running
    statistics in those dtypes on the same device, when Triton is installed and
    :data:`use_fused` is set.
    """
    global _triton_module
    if not (use_fused and x.device.type == _FUSED_DEVICE and x.dtype in _FUSED_DTYPES
            and x.numel()):
        return None
    for t in (weight, bias, running_mean, running_var):
        if t is not None and (t.dtype not in _FUSED_DTYPES or t.device != x.device):
            return None
    if nbt is not None and nbt.device != x.device:
        return None
    if _triton_module is None:
        try:
            from bncore import _triton
        except ImportError:  # Triton is not installed: the plain path does the work
            _triton_module = False
        else:
            _triton_module = _triton
    return _triton_module or None


# ----------------------------------------------------------------------------------------
# The autograd function and the functional interface.
# ----------------------------------------------------------------------------------------


class BatchNormFunction(torch.autograd.Function):
    r"""Batch normalization with an explicit analytic backward (see the module docstring).

    ``BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training,
    momentum, eps, num_batches_tracked=None)``: the arguments of :func:`batch_norm` in the
    order of ``torch.batch_norm``. ``weight``, ``bias`` and the running statistics may be
    ``None``. With ``training=True`` and running statistics given, they are updated in place
    (and ``num_batches_tracked``, when given, is advanced by one), unless the batch statistics
    are not finite. ``momentum=None`` means a cumulative average and needs
    ``num_batches_tracked``.

    Gradients flow to ``input``, ``weight`` and ``bias``. Double backward is not supported:
    the backward is ``once_differentiable`` and differentiating it raises a RuntimeError.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        momentum: float | None,
        eps: float,
        num_batches_tracked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_args(input, weight, bias, running_mean, running_var, training, momentum, eps,
                    num_batches_tracked)
        fused = _fused_kernels(input, weight, bias, running_mean, running_var,
                               num_batches_tracked)
        if fused is not None:
            out, x, stats = fused.forward(input, weight, bias, running_mean, running_var,
                                          num_batches_tracked, training, momentum, eps)
            ctx.save_for_backward(x, weight, stats)
        else:
            out, saved = _plain_forward(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, training, momentum, eps)
            ctx.save_for_backward(*saved)
        ctx.fused, ctx.training = fused, training
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ctx.fused is not None:
            x, weight, stats = ctx.saved_tensors
            grad_input, grad_weight, grad_bias = ctx.fused.backward(
                grad_output, x, weight, stats, ctx.training, need_input, need_weight,
                need_bias, ctx.bias_dtype)
        else:
            grad_input, sum_dy_xhat, sum_dy = _plain_backward(
                grad_output, ctx.saved_tensors, ctx.training, need_input,
                need_weight or need_bias)
            grad_weight = grad_bias = None
            if need_weight or need_bias:  # then _plain_backward made both sums
                assert sum_dy_xhat is not None and sum_dy is not None
                grad_weight = sum_dy_xhat.to(ctx.weight_dtype) if need_weight else None
                grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Batch normalization, with the signature and semantics of
    :func:`torch.nn.functional.batch_norm`.

    Args:
        input: tensor of shape (N, C, *), floating point.
        running_mean, running_var: (C,) tensors or ``None``. Used to normalize when
            ``training=False``; updated in place when ``training=True``
            (``running = (1 - momentum) * running + momentum * batch_stat``, with the unbiased
            batch variance), unless the batch statistics are not finite.
        weight, bias: (C,) tensors (``gamma`` and ``beta``) or ``None``.
        training: use (and track) the batch statistics.
        momentum: the weight of the new batch in the running statistics.
        eps: added to the variance; must be positive.

    Returns:
        a tensor with the shape and dtype of ``input``.
    """
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training,
                                   momentum, eps, None)


# ----------------------------------------------------------------------------------------
# The modules.
# ----------------------------------------------------------------------------------------


class _BatchNorm(nn.Module):
    """The part BatchNorm1d, BatchNorm2d and :class:`bncore.distributed.SyncBatchNorm` share;
    like ``torch.nn.modules.batchnorm._BatchNorm``.

    Parameters ``weight`` and ``bias`` and buffers ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` carry PyTorch's names, shapes and dtypes, so that state dicts
    load both ways between these modules and PyTorch's.
    """

    _version = 2  # the state-dict version of PyTorch's modules (num_batches_tracked exists)
    _input_dims: tuple[int, ...] = ()
    _input_shapes = ""
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    # Registered in __init__; None without affine (weight and bias) or without
    # track_running_stats (the buffers).
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer(
                "running_mean", torch.zeros(num_features, device=device, dtype=dtype)
            )
            self.register_buffer(
                "running_var", torch.ones(num_features, device=device, dtype=dtype)
            )
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            # Tensors: __init__ registered them so with track_running_stats=True.
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            assert self.weight is not None  # registered as a Parameter with affine=True
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _check_input_dim(self, input: torch.Tensor) -> None:
        """The module's input checks, in one place: number of dimensions and channels."""
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name} expects a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in self._input_dims:
            raise ValueError(
                f"{name} expects input of shape {self._input_shapes}, "
                f"got input of shape {_shape(input)} ({input.dim()}-d)"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{name}({self.num_features}) expects input of shape {self._input_shapes} "
                f"with C = {self.num_features}, got input of shape {_shape(input)} "
                f"(C = {input.shape[1]})"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # As torch.nn.modules.batchnorm._BatchNorm.forward, except that num_batches_tracked is
        # advanced inside BatchNormFunction, after the checks and only on a finite batch.
        # Batch statistics are used in training, and in evaluation when there are no buffers.
        if self.training:
            use_batch_stats = True
        else:
            use_batch_stats = self.running_mean is None and self.running_var is None
        # The buffers are passed when they are to be updated or to be used.
        pass_buffers = not self.training or self.track_running_stats
        counting = self.training and self.track_running_stats
        nbt = self.num_batches_tracked if counting else None
        momentum = self.momentum
        if momentum is None and nbt is None:
            momentum = 0.0  # PyTorch's exponential_average_factor before it is set
        return BatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            use_batch_stats,
            momentum,
            self.eps,
            nbt,
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # State dicts saved before num_batches_tracked existed (version < 2) load with 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class BatchNorm1d(_BatchNorm):
    r"""Batch normalization over a 2-d or 3-d input; a drop-in for :class:`torch.nn.BatchNorm1d`.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    The mean and the (biased) variance are taken per channel over N, or over N and L. The
    running variance is updated with the unbiased batch variance.

    Args:
        num_features: the number of channels C.
        eps: added to the variance for numerical stability; must be positive. Default: 1e-5
        momentum: the weight of the new batch in the running statistics, or ``None`` for a
            cumulative average. Default: 0.1
        affine: learn ``weight`` (gamma, initialized to 1) and ``bias`` (beta, 0). Default: True
        track_running_stats: keep ``running_mean`` and ``running_var`` for evaluation; if
            ``False``, batch statistics are used in training and evaluation. Default: True
        device, dtype: of the parameters and buffers.
        bias: learn ``bias`` too (with ``affine=True``). Default: True

    Shape:
        - Input: (N, C) or (N, C, L)
        - Output: the same shape (and dtype) as the input
    """

    _input_dims = (2, 3)
    _input_shapes = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    r"""Batch normalization over a 4-d input; a drop-in for :class:`torch.nn.BatchNorm2d`.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    The mean and the (biased) variance are taken per channel over N, H and W. The running
    variance is updated with the unbiased batch variance. Arguments as :class:`BatchNorm1d`.

    Shape:
        - Input: (N, C, H, W), in either memory format (contiguous or channels_last)
        - Output: the same shape, dtype and memory format as the input
    """

    _input_dims = (4,)
    _input_shapes = "(N, C, H, W)"


# SyncBatchNorm (chapter 6) is bncore.distributed's, which builds on _BatchNorm: re-exported
# here on first use, so that either module can be imported first.
if TYPE_CHECKING:
    from bncore.distributed import SyncBatchNorm as SyncBatchNorm
else:

    def __getattr__(name: str) -> Any:
        if name == "SyncBatchNorm":
            from bncore.distributed import SyncBatchNorm

            return SyncBatchNorm
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
