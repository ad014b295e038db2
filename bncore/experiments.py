"""Small, seeded training experiments shared by the reading pages (PyTorch, CPU).

The nets are tiny (digits is 1797 images of 8x8), so every experiment runs in seconds on two
cores. Each function seeds its own generator: the same arguments give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from bncore.data import Split

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and return a generator for batch sampling."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def mlp(sizes: list[int], activation: str = "relu", bn: str | None = None,
        bn_layer: Callable[[int], nn.Module] = nn.BatchNorm1d, bias: bool = True) -> nn.Sequential:
    """A fully connected net: sizes = [in, hidden..., out].

    bn: None (no batch norm), "before" (Linear -> BN -> activation, as in the paper) or
    "after" (Linear -> activation -> BN). The last layer is a plain Linear (logits).
    """
    if bn not in (None, "before", "after"):
        raise ValueError(f"bn must be None, 'before' or 'after', got {bn!r}")
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if bn == "before":
            layers.append(bn_layer(fan_out))
        layers.append(ACTIVATIONS[activation]())
        if bn == "after":
            layers.append(bn_layer(fan_out))
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


def small_cnn(channels: tuple[int, int] = (16, 32), n_classes: int = 10, bn: str | None = None,
              activation: str = "relu") -> nn.Sequential:
    """A two-conv net for (N, 1, 8, 8) digits: conv3x3 -> [BN] -> act -> [BN] -> pool, twice,
    then a Linear. bn as in :func:`mlp`."""
    if bn not in (None, "before", "after"):
        raise ValueError(f"bn must be None, 'before' or 'after', got {bn!r}")
    layers: list[nn.Module] = []
    in_ch = 1
    for out_ch in channels:
        layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        if bn == "before":
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(ACTIVATIONS[activation]())
        if bn == "after":
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.MaxPool2d(2))
        in_ch = out_ch
    layers += [nn.Flatten(), nn.Linear(in_ch * 2 * 2, n_classes)]
    return nn.Sequential(*layers)


def as_tensors(split: Split, image: bool = False):
    """(X_train, y_train, X_test, y_test) as float32/int64 tensors; image=True gives (N, 1, 8, 8)."""
    shape = (-1, 1, 8, 8) if image else (-1, split.X_train.shape[1])
    return (torch.as_tensor(split.X_train, dtype=torch.float32).reshape(shape),
            torch.as_tensor(split.y_train),
            torch.as_tensor(split.X_test, dtype=torch.float32).reshape(shape),
            torch.as_tensor(split.y_test))


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Classification accuracy in eval mode (running statistics); the model's mode is restored."""
    was_training = model.training
    model.eval()
    acc = (model(X).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def train_classifier(model: nn.Module, split: Split, steps: int, batch_size: int = 60,
                     lr: float = 0.1, seed: int = 0, eval_every: int = 50, image: bool = False,
                     optimizer: str = "sgd",
                     on_step: Callable[[int, nn.Module], None] | None = None) -> dict:
    """Train with cross-entropy on random mini-batches (sampled with replacement across steps).

    on_step(step, model) is called after every update, for recording activations.
    Returns {"step": [...], "test_acc": [...], "train_loss": [...]} with one entry per
    evaluation (every ``eval_every`` steps, and at step 0).
    """
    gen = seed_everything(seed)
    X_train, y_train, X_test, y_test = as_tensors(split, image=image)
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    loss_fn = nn.CrossEntropyLoss()
    history = {"step": [0], "test_acc": [accuracy(model, X_test, y_test)], "train_loss": [np.nan]}
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(X_train), (batch_size,), generator=gen)
        loss = loss_fn(model(X_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, model)
        if step % eval_every == 0 or step == steps:
            history["step"].append(step)
            history["test_acc"].append(accuracy(model, X_test, y_test))
            history["train_loss"].append(loss.item())
    return history
