"""Batch norm at inference time: running statistics, the train/eval gap, precise BN, folding.

The helpers of chapter 4, written for PyTorch models (CPU or CUDA). They work on any module that
carries batch-norm buffers (``running_mean``, ``running_var``, ``momentum``), so torch's own
``nn.BatchNorm1d``/``nn.BatchNorm2d`` and the drop-ins of ``bncore.torch`` are treated alike.

- :func:`predict_train_mode` runs a model in training mode (batch statistics) without touching its
  running statistics, and :func:`mode_gap` compares that with eval mode (running statistics).
- :func:`precise_bn` recomputes the running statistics after training: one pass over data with
  the weights frozen and a cumulative average (``momentum=None``).
- :class:`KerasMomentumBatchNorm1d` keeps its running statistics with Keras's momentum convention.
- :func:`fold_model` folds every BN that follows a Linear or Conv2d into that layer.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Protocol, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormLayer(Protocol):
    """What these helpers use of a batch-norm layer: torch's ``nn.BatchNorm1d``/``2d`` and the
    drop-ins of ``bncore.torch`` both have it. Buffers and parameters have shape (C,)."""

    training: bool
    num_features: int
    eps: float
    momentum: float | None

    @property
    def running_mean(self) -> torch.Tensor | None: ...

    @property
    def running_var(self) -> torch.Tensor | None: ...

    @property
    def weight(self) -> torch.Tensor | None: ...

    @property
    def bias(self) -> torch.Tensor | None: ...

    def reset_running_stats(self) -> None: ...


def is_batch_norm(module: nn.Module) -> TypeGuard[BatchNormLayer]:
    """True for a batch-norm layer with running statistics (torch's or a drop-in)."""
    return all(hasattr(module, name) for name in ("running_mean", "running_var", "momentum"))


def batch_norm_layers(model: nn.Module) -> list[BatchNormLayer]:
    """Every batch-norm layer of ``model``, in order."""
    return [m for m in model.modules() if is_batch_norm(m)]


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random partition of range(n) into batches of ``batch_size``; a last batch smaller
    than 2 is merged into the one before (batch norm cannot train on one example)."""
    order = torch.randperm(n, generator=generator)
    chunks = list(torch.split(order, batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        last = chunks.pop()
        chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


@torch.no_grad()
def predict_train_mode(model: nn.Module, X: torch.Tensor, batch_size: int,
                       seed: int = 0) -> torch.Tensor:
    """Outputs of ``model`` in training mode, X split into random batches of ``batch_size``.

    Each example is normalized with the statistics of the batch it happens to land in, as during
    training. The model itself is left untouched (a copy runs), running statistics included.
    Returns the outputs in the order of X.
    """
    clone = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(seed)
    out = None
    for idx in _batches(len(X), batch_size, gen):
        y = clone(X[idx])
        if out is None:
            out = y.new_empty((len(X),) + y.shape[1:])
        out[idx] = y
    if out is None:
        raise ValueError(f"X holds no example (shape {tuple(X.shape)})")
    return out


@torch.no_grad()
def mode_gap(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int,
             repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Accuracy and cross-entropy of ``model`` in training mode (batch statistics, batches of
    ``batch_size``, averaged over ``repeats`` random splits into batches) and in eval mode
    (running statistics). ``gap`` is train-mode accuracy minus eval-mode accuracy."""
    was_training = model.training
    train_acc, train_loss = [], []
    for r in range(repeats):
        logits = predict_train_mode(model, X, batch_size, seed=seed + r)
        train_acc.append((logits.argmax(1) == y).float().mean().item())
        train_loss.append(F.cross_entropy(logits, y).item())
    model.eval()
    logits = model(X)
    model.train(was_training)
    result = {"train_acc": sum(train_acc) / repeats, "train_loss": sum(train_loss) / repeats,
              "eval_acc": (logits.argmax(1) == y).float().mean().item(),
              "eval_loss": F.cross_entropy(logits, y).item()}
    result["gap"] = result["train_acc"] - result["eval_acc"]
    return result


@torch.no_grad()
def precise_bn(model: nn.Module, X: torch.Tensor, batch_size: int | None = None,
               seed: int = 0) -> nn.Module:
    """Recompute every BN layer's running statistics, weights frozen ("precise BN").

    The running statistics are reset and re-estimated in one pass over X in training
    mode with ``momentum=None`` (torch's cumulative average: every batch gets the same
    weight). With ``batch_size=None`` the whole of X is one batch. The momentum and the
    mode are restored; the model is changed in place and returned.
    """
    layers = batch_norm_layers(model)
    momenta = [bn.momentum for bn in layers]
    was_training = model.training
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for idx in _batches(len(X), batch_size or len(X), gen):
        model(X[idx])
    for bn, momentum in zip(layers, momenta, strict=True):
        bn.momentum = momentum
    model.train(was_training)
    return model


class KerasMomentumBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose running statistics follow Keras's momentum convention.

    Keras weighs the OLD value: ``running = momentum * running + (1 - momentum) * batch``
    (default 0.99); torch weighs the NEW batch: ``running = (1 - momentum) * running +
    momentum * batch`` (default 0.1). Everything else (unbiased variance in the running
    estimate, eps, the outputs) is torch's, so the two layers differ only in that convention.
    """

    momentum: float

    def __init__(self, num_features: int, momentum: float = 0.99, **kwargs: Any) -> None:
        if momentum is None:
            raise ValueError("momentum must be a number in [0, 1] (Keras's convention has no "
                             "cumulative average), got None")
        super().__init__(num_features, momentum=momentum, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)  # (N, C) or (N, C, L), before any state changes
        out = F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        if self.running_mean is None or self.running_var is None:  # track_running_stats=False
            return out
        with torch.no_grad():
            dims = [0, *range(2, x.dim())]  # every axis but the channel axis 1
            mean, var = x.mean(dims), x.var(dims, unbiased=True)
            self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean)
            self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked += 1
        return out


def _stats_to_fold(layer: nn.Linear | nn.Conv2d,
                   bn: BatchNormLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn``'s running mean and variance, (C,) each, after checking that ``bn`` can be folded
    into ``layer``: ValueError unless ``bn`` is in eval mode, has running statistics and as many
    channels as ``layer`` has outputs (the checks of bncore.numpy.fold_batch_norm)."""
    if bn.training:
        raise ValueError("fold_bn needs an eval-mode BN: call bn.eval() first (in training "
                         "mode it normalizes with each batch's statistics)")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BN without running statistics "
                         "(track_running_stats=False normalizes with batch statistics)")
    if not bn.eps > 0:
        raise ValueError(f"eps must be > 0, got {bn.eps!r}")
    weight = layer.weight
    if weight.dim() < 2 or weight.shape[0] != bn.num_features:
        raise ValueError(f"the layer's weight of shape {tuple(weight.shape)} has "
                         f"{weight.shape[0]} output channels; the BN has "
                         f"num_features={bn.num_features}")
    return bn.running_mean, bn.running_var


@torch.no_grad()
def fold_bn(layer: nn.Linear | nn.Conv2d,
            bn: BatchNormLayer) -> nn.Linear | nn.Conv2d:
    """A copy of ``layer`` (nn.Linear or nn.Conv2d) with the eval-mode ``bn`` that
    follows it folded in: ``W' = W * gamma / sqrt(var + eps)`` (one factor per output
    channel) and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``."""
    mean, var = _stats_to_fold(layer, bn)  # ValueError for a BN that cannot be folded
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    folded = copy.deepcopy(layer)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(mean)
    shift = bn.bias if bn.bias is not None else torch.zeros_like(mean)
    per_channel = (-1,) + (1,) * (layer.weight.dim() - 1)  # (C_out, 1, ...)
    folded.weight.copy_(layer.weight * scale.reshape(per_channel))
    folded.bias = nn.Parameter((bias - mean) * scale + shift)
    return folded


def fold_model(model: nn.Sequential) -> nn.Sequential:
    """A copy of ``model`` for inference (in eval mode), with every BN that directly follows a
    Linear or Conv2d folded into it (the BN disappears). Other layers are copied as they are.
    Each BN is folded as it acts in eval mode, whatever mode ``model`` is in; ``model`` itself
    is left untouched."""
    layers: list[nn.Module] = []
    for module in copy.deepcopy(model).eval():
        if is_batch_norm(module) and layers and isinstance(layers[-1], (nn.Linear, nn.Conv2d)):
            layers[-1] = fold_bn(layers[-1], module)
        else:
            layers.append(module)
    return nn.Sequential(*layers).eval()


@torch.no_grad()
def time_forward(model: nn.Module, X: torch.Tensor, repeats: int = 50, warmup: int = 5) -> float:
    """Best (smallest) wall-clock seconds of one eval-mode forward pass of ``model`` on X.

    The minimum, not the mean: on a shared machine other work only ever adds time. The model's
    mode (training or eval, module by module) is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        for _ in range(warmup):
            model(X)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(X)
            best = min(best, time.perf_counter() - start)
    finally:
        for module, training in modes:
            module.training = training
    return best


def time_forward_pair(model_a: nn.Module, model_b: nn.Module, X: torch.Tensor,
                      repeats: int = 50, rounds: int = 5) -> tuple[float, float]:
    """Best forward times of two models on X, measured in alternating rounds so that both see
    the same load on a busy machine. Returns (seconds for model_a, seconds for model_b)."""
    per_round = max(1, repeats // rounds)
    best_a = best_b = float("inf")
    for _ in range(rounds):
        best_a = min(best_a, time_forward(model_a, X, per_round, warmup=2))
        best_b = min(best_b, time_forward(model_b, X, per_round, warmup=2))
    return best_a, best_b
