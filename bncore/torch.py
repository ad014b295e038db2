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

The output has the shape, dtype and memory format of the input. Statistics are accumulated
in float32 for float16 and bfloat16 input (float64 stays float64) with the corrected
two-pass algorithm: a first mean, then the sums of the deviations from it, which give the
variance and correct the rounding error of the mean. A large offset does not cancel them, as
it would in the one-pass ``E[x^2] - E[x]^2``.

Where this module differs from PyTorch, on purpose:

- a bad input raises before anything changes (PyTorch's modules advance
  ``num_batches_tracked`` before they check the batch): wrong ndim or channel count and
  ``eps <= 0`` raise ``ValueError`` (PyTorch: ``RuntimeError`` for the channels, and
  ``eps = 0`` is accepted in evaluation), integer input ``TypeError``;
- a training step whose batch mean or variance is not finite (NaN or inf in the input)
  still propagates the NaN to the output, but leaves ``running_mean``, ``running_var`` and
  ``num_batches_tracked`` exactly as they were; PyTorch would write the NaN into the
  running statistics, and every later evaluation would return NaN. The check runs on the
  device (``torch.where`` on a finite flag), so it costs no host synchronization;
- double backward is not supported (the backward is marked ``once_differentiable``).

On CPU the sums of the second pass run block by block, so that the centred values
``x - mean`` live in cache instead of in a full-size temporary, and the output is one
multiply-add per element, ``x * scale + shift``. On CUDA a fused Triton path
(:mod:`bncore._triton`) is used when Triton is installed; set ``bncore.torch.use_fused =
False`` to force the plain path, which is its reference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["BatchNormFunction", "batch_norm", "BatchNorm1d", "BatchNorm2d"]

#: Use the fused Triton kernels on CUDA when Triton is installed (the plain path otherwise).
use_fused = True

# On CPU, the reductions work block by block, each block at most this many elements:
# small enough that a block and its temporaries stay in cache, and just below ATen's parallel
# grain size (32768), so that each operation on a block runs on one thread. Hundreds of tiny
# parallel regions cost more than they gain, and far more on a machine that is shared.
_BLOCK_ELEMENTS = 32767
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------
# Checks: every bad input is rejected here, before any state changes.
# ----------------------------------------------------------------------------------------


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def _check_args(input, weight, bias, running_mean, running_var, training, momentum, eps, nbt):
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
        if t is not None and tuple(t.shape) != (channels,):
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
# The plain path: a few PyTorch operations, block by block on CPU.
# ----------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    blocks = []
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


def _centered_sums(x, mean, dy=None):
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


def _affine_centered(x, mean, scale, shift, dy=None, dy_scale=None, out_dtype=None):
    """``(x - mean) * scale + shift`` (``+ dy * dy_scale``), per channel, in a new tensor.

    Computed as ``x * scale + (shift - mean * scale)`` in one pass over x, as PyTorch's kernel
    does. Its rounding error, about ``eps * |x| / std`` relative to the output, is that of the
    float x itself: with an offset of 1e4 and std 1 in float32, 1e-3 of the output's unit.
    """
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)  # keeps x's memory format
    s, b = _channel_view(scale, x), _channel_view(shift - mean * scale, x)
    if dy is None:
        return torch.addcmul(b, x, s, out=out)
    t = torch.addcmul(b, x, s, out=out if out.dtype == mean.dtype else None)
    t.addcmul_(dy, _channel_view(dy_scale, x))
    return t if t is out else out.copy_(t)  # float16 and bfloat16: rounded once, at the end


class _PlainOps:
    channel_mean = staticmethod(_channel_mean)
    centered_sums = staticmethod(_centered_sums)
    affine_centered = staticmethod(_affine_centered)


_triton_module = None


def _ops_for(x: torch.Tensor):
    """The fused Triton kernels for CUDA input when available, else the plain path."""
    global _triton_module
    if not (use_fused and x.device.type == "cuda" and x.dtype in _FUSED_DTYPES and x.numel()):
        return _PlainOps
    if _triton_module is None:
        try:
            from bncore import _triton
        except ImportError:  # Triton is not installed: the plain path does the work
            _triton = False
        _triton_module = _triton
    return _triton_module or _PlainOps


# ----------------------------------------------------------------------------------------
# Running statistics: updated on the device, and only when the batch statistics are finite.
# ----------------------------------------------------------------------------------------


def _update_running_stats(running_mean, running_var, nbt, mean, var, count, momentum):
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()  # 0-d, stays on the device
    if nbt is not None:
        # An empty batch counts as a batch (as in torch) but changes no statistic.
        nbt.add_(1 if count == 0 else finite)
    if running_mean is None:
        return
    if momentum is None:  # cumulative average: 1 / (number of finite batches so far)
        momentum = nbt.to(mean.dtype).reciprocal()
    unbiased_var = var * (count / (count - 1))
    for running, stat in ((running_mean, mean), (running_var, unbiased_var)):
        new = (1 - momentum) * running.to(stat.dtype) + momentum * stat
        running.copy_(torch.where(finite, new, running.to(stat.dtype)))


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
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps,
                num_batches_tracked=None):
        _check_args(input, weight, bias, running_mean, running_var, training, momentum, eps,
                    num_batches_tracked)
        ops = _ops_for(input)
        cdtype = _compute_dtype(input.dtype)
        count = input.numel() // max(input.shape[1], 1)  # M, the values per channel
        if training:
            # The corrected two-pass algorithm: a first mean, then the sums of the deviations
            # from it, which correct the rounding error of the mean and give the variance.
            mean = ops.channel_mean(input)
            sum_xc, sum_xc2 = ops.centered_sums(input, mean)
            mean = mean + sum_xc / count
            var = (sum_xc2 - sum_xc * sum_xc / count) / count  # biased: the one that normalizes
            _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                  count, momentum)
        else:
            # copies: the saved statistics must not change if the buffers do before backward
            mean = running_mean.to(cdtype, copy=True)
            var = running_var.to(cdtype)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(cdtype)
        shift = torch.zeros_like(invstd) if bias is None else bias.to(cdtype)
        out = ops.affine_centered(input, mean, scale, shift, out_dtype=input.dtype)

        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training, ctx.count, ctx.ops = training, count, ops
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        ops, count = ctx.ops, ctx.count
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        dy = grad_output
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)  # gamma / sigma

        grad_input = grad_weight = grad_bias = None
        if ctx.training or need_weight or need_bias:
            sum_dy, sum_dy_xc = ops.centered_sums(input, mean, dy)  # sum(dy), sum(dy * (x - mu))
        if need_input and ctx.training:
            # dx = scale / M * (M dy - sum(dy) - x_hat sum(dy x_hat)), written as
            # dx = scale * dy + (x - mu) * b + d, with per-channel b and d:
            b = -scale * invstd * invstd * sum_dy_xc / count
            d = -scale * sum_dy / count
            grad_input = ops.affine_centered(input, mean, b, d, dy, scale, out_dtype=input.dtype)
        elif need_input:  # evaluation: the statistics are constants
            grad_input = (dy * _channel_view(scale, dy)).to(input.dtype)
        if need_weight:
            grad_weight = (sum_dy_xc * invstd).to(weight.dtype)  # sum(dy * x_hat)
        if need_bias:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
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
    """The part BatchNorm1d and BatchNorm2d share; like ``torch.nn.modules.batchnorm._BatchNorm``.

    Parameters ``weight`` and ``bias`` and buffers ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` carry PyTorch's names, shapes and dtypes, so that state dicts
    load both ways between these modules and PyTorch's.
    """

    _version = 2  # the state-dict version of PyTorch's modules (num_batches_tracked exists)
    _input_dims: tuple[int, ...] = ()
    _input_shapes = ""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
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
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
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



from bncore.distributed import SyncBatchNorm as SyncBatchNorm  # noqa: E402  (chapter 6)
