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

import torch
import torch.nn.functional as F
from torch import nn


def is_batch_norm(module: nn.Module) -> bool:
    """True for a batch-norm layer with running statistics (torch's or a drop-in)."""
    return all(hasattr(module, name) for name in ("running_mean", "running_var", "momentum"))


def batch_norm_layers(model: nn.Module) -> list[nn.Module]:
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
    return out


@torch.no_grad()
def mode_gap(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int,
             repeats: int = 3, seed: int = 0) -> dict:
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

    def __init__(self, num_features: int, momentum: float = 0.99, **kwargs):
        super().__init__(num_features, momentum=momentum, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        out = F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        with torch.no_grad():
            mean, var = x.mean(0), x.var(0, unbiased=True)
            self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean)
            self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var)
            self.num_batches_tracked += 1
        return out


@torch.no_grad()
def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` (nn.Linear or nn.Conv2d) with the eval-mode ``bn`` that follows
    it folded in: ``W' = W * gamma / sqrt(var + eps)`` (one factor per output channel)
    and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    folded = copy.deepcopy(layer)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    shift = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    per_channel = scale.reshape((-1,) + (1,) * (layer.weight.dim() - 1))
    folded.weight.copy_(layer.weight * per_channel)
    folded.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)
    return folded


def fold_model(model: nn.Sequential) -> nn.Sequential:
    """A copy of ``model`` for inference, with every BN that directly follows a Linear or
    Conv2d folded into it (the BN disappears). Other layers are copied as they are."""
    layers: list[nn.Module] = []
    for module in model:
        if is_batch_norm(module) and layers and isinstance(layers[-1], (nn.Linear, nn.Conv2d)):
            layers[-1] = fold_bn(layers[-1], module)
        else:
            layers.append(copy.deepcopy(module))
    return nn.Sequential(*layers).eval()


@torch.no_grad()
def time_forward(model: nn.Module, X: torch.Tensor, repeats: int = 50, warmup: int = 5) -> float:
    """Best (smallest) wall-clock seconds of one eval-mode forward pass of ``model`` on X.

    The minimum, not the mean: on a shared machine other work only ever adds time."""
    model.eval()
    for _ in range(warmup):
        model(X)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(X)
        best = min(best, time.perf_counter() - start)
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
