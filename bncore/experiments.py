"""Small, seeded training experiments shared by the reading pages (PyTorch, CPU).

The nets are tiny (digits is 1797 images of 8x8), so every experiment runs in seconds on two
cores. Each function seeds its own generator: the same arguments give the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
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
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1], strict=True):
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


def as_tensors(split: Split, image: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X_train, y_train, X_test, y_test) as float32/int64 tensors.

    image=True reshapes X to (N, 1, 8, 8) for a conv net.
    """
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
                     on_step: Callable[[int, nn.Module], None] | None = None
                     ) -> dict[str, list[Any]]:
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
    history: dict[str, list[Any]] = {"step": [0], "test_acc": [accuracy(model, X_test, y_test)],
                                     "train_loss": [np.nan]}
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


def placement_sweep(arch: str = "mlp", placements: tuple = (None, "before", "after"),
                    seeds: tuple[int, ...] = (0, 1, 2, 3, 4), steps: int = 300, lr: float = 0.1,
                    activation: str = "relu", sizes: tuple[int, ...] = (64, 64, 64, 10),
                    channels: tuple[int, int] = (8, 16), eval_every: int = 100,
                    split: Split | None = None) -> dict[str, Any]:
    """Train one net per (placement, seed) on digits and record its test accuracy.

    arch: "mlp" (:func:`mlp` with ``sizes``) or "cnn" (:func:`small_cnn` with ``channels``).
    The runs are paired: for a given seed every placement starts from the same Linear/Conv
    weights (BatchNorm layers draw no random numbers) and sees the same mini-batches.
    Returns {"placements": [...], "seeds": [...], "step": [...], "test_acc": array (P, S, T)}
    with T evaluations (step 0, every ``eval_every`` steps, and the last step).
    """
    if arch not in ("mlp", "cnn"):
        raise ValueError(f"arch must be 'mlp' or 'cnn', got {arch!r}")
    if split is None:
        from bncore.data import digits

        split = digits()
    # These nets are so small that extra threads only add overhead (and on a shared machine,
    # contention): one thread is several times faster. The caller's setting is restored.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    acc = []
    try:
        for placement in placements:
            row = []
            for seed in seeds:
                seed_everything(seed)
                model = (mlp(list(sizes), activation, bn=placement) if arch == "mlp"
                         else small_cnn(channels, bn=placement, activation=activation))
                history = train_classifier(model, split, steps, lr=lr, seed=seed,
                                           eval_every=eval_every, image=arch == "cnn")
                row.append(history["test_acc"])
            acc.append(row)
    finally:
        torch.set_num_threads(threads)
    return {"placements": list(placements), "seeds": list(seeds), "step": history["step"],
            "test_acc": np.array(acc)}


def seed_summary(values: ArrayLike, axis: int = -1) -> dict[str, np.ndarray]:
    """Mean, sample standard deviation (ddof=1), min and max over the seeds' axis."""
    values = np.asarray(values, dtype=float)
    return {"mean": values.mean(axis), "std": values.std(axis, ddof=1),
            "min": values.min(axis), "max": values.max(axis)}


# --- Probing a net while it trains: layer inputs, noisy batch norm, gradient predictiveness ---

def gaussian_init_(model: nn.Module, std: float | None = None) -> nn.Module:
    """Re-draw every Linear's weights from N(0, std^2) and zero its bias, in place.

    std=None uses 1/sqrt(fan_in): "small random Gaussian values" as in the batch-norm paper's
    MNIST net (the paper gives no number). Uses torch's global generator; returns the model.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0,
                            std if std is not None else module.weight.shape[1] ** -0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


@contextlib.contextmanager
def state_preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block that may change the model, then put it back exactly as it was: parameters,
    buffers (running statistics, num_batches_tracked), train/eval mode and torch's CPU random
    state. Parameters are restored in place, so an optimizer holding them keeps working."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        try:
            yield model
        finally:
            model.load_state_dict(saved)
            model.train(was_training)


def _capture_inputs(model: nn.Module, kind: type[nn.Module]
                    ) -> tuple[list[torch.Tensor], list[torch.utils.hooks.RemovableHandle]]:
    """Register forward hooks that append the input of every `kind` module to a list."""
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
               for m in model.modules() if isinstance(m, kind)]
    return captured, handles


def layer_inputs(model: nn.Module, X: torch.Tensor, kind: type[nn.Module] = nn.Sigmoid,
                 train: bool = True) -> list[np.ndarray]:
    """The input of every `kind` module (by default every sigmoid) for one forward pass of X.

    Returns one float64 array (N, H) per such module, in forward order. train=True runs the
    forward in training behaviour (batch statistics; noise where a layer adds it), which is what
    the next layer sees while the net trains. Nothing about the model changes: running
    statistics, mode and torch's random state are restored (see :func:`state_preserved`).
    """
    captured, handles = _capture_inputs(model, kind)
    try:
        with state_preserved(model), torch.no_grad():
            model.train(train)
            model(X)
    finally:
        for handle in handles:
            handle.remove()
    return [z.detach().cpu().double().numpy() for z in captured]


def layer_input_gradients(model: nn.Module, X: torch.Tensor, y: torch.Tensor,
                          kind: type[nn.Module] = nn.Sigmoid) -> tuple[list, list]:
    """Inputs of every `kind` module and the gradient of the mean cross-entropy on (X, y) with
    respect to them, in training behaviour. Returns (inputs, grads): two lists of float64
    arrays (N, H). Parameter ``.grad`` fields and the model's state are left untouched."""
    captured, handles = _capture_inputs(model, kind)
    try:
        with state_preserved(model), torch.enable_grad():
            model.train(True)
            loss = nn.functional.cross_entropy(model(X), y)
            grads = torch.autograd.grad(loss, captured)
    finally:
        for handle in handles:
            handle.remove()
    as_np = [t.detach().cpu().double().numpy() for t in captured]
    return as_np, [g.detach().cpu().double().numpy() for g in grads]


class NoisyBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d followed, in training mode, by a random scale and shift of every unit that is
    drawn afresh at every forward pass ("noisy BatchNorm", after Santurkar et al., 2018):

        y = s * BN(x) + m,   s ~ exp(U(-log scale, log scale)),   m ~ U(-shift, shift),

    one (s, m) per unit and step, shared by the whole mini-batch, so the distribution of the next
    layer's input jumps at every step whatever the parameters do. In eval mode it is plain
    BatchNorm1d. The draws use torch's global generator.
    """

    def __init__(self, num_features: int, shift: float = 1.0, scale: float = 2.0,
                 **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        if shift < 0 or scale < 1:
            raise ValueError(f"need shift >= 0 and scale >= 1, got {shift} and {scale}")
        self.shift, self.scale = float(shift), float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.training:
            return out
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        log_s = (torch.rand(shape, device=x.device) * 2 - 1) * np.log(self.scale)
        m = (torch.rand(shape, device=x.device) * 2 - 1) * self.shift
        return out * log_s.exp().to(out.dtype) + m.to(out.dtype)


def gradient_predictiveness(model: nn.Module, X: torch.Tensor, y: torch.Tensor,
                            step_sizes: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """Move along the gradient and see how well it predicted the loss and itself.

    At the current parameters theta, with g = grad L(theta) for the mean cross-entropy on the
    batch (X, y) in training behaviour, and for every step size eta:

    - ``loss[k]``: L(theta - eta_k g), the loss after a step of size eta_k;
    - ``grad_change[k]``: ||grad L(theta - eta_k g) - g||_2, how much the gradient changed;
    - ``beta``: max_k grad_change[k] / (eta_k ||g||_2), the "effective beta-smoothness"
      (Santurkar et al., 2018): the gradient's Lipschitz constant along the step.

    Also returns ``loss0`` = L(theta) and ``grad_norm`` = ||g||_2. Every evaluation reseeds
    torch with ``seed``, so a noisy layer draws the same noise each time and all the
    evaluations see one and the same function. The model is restored afterwards.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grad() -> tuple[float, torch.Tensor]:
        torch.manual_seed(seed)
        loss = nn.functional.cross_entropy(model(X), y)
        grads = torch.autograd.grad(loss, params)
        return loss.item(), torch.cat([g.reshape(-1) for g in grads])

    out: dict[str, Any] = {"loss": [], "grad_change": []}
    with state_preserved(model), torch.enable_grad():
        model.train(True)
        start = [p.detach().clone() for p in params]
        out["loss0"], g0 = loss_and_grad()
        for eta in step_sizes:
            with torch.no_grad():
                offset = 0
                for p, p0 in zip(params, start, strict=True):
                    p.copy_(p0 - eta * g0[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            loss, g = loss_and_grad()
            out["loss"].append(loss)
            out["grad_change"].append((g - g0).norm().item())
    out["grad_norm"] = g0.norm().item()
    out["loss"] = np.array(out["loss"])
    out["grad_change"] = np.array(out["grad_change"])
    steps = np.asarray(step_sizes, dtype=float)
    out["beta"] = float(np.max(out["grad_change"] / (steps * max(out["grad_norm"], 1e-30))))
    return out


def watch_training(model: nn.Module, split: Split, steps: int, every: int = 10,
                   lr: float = 0.1, seed: int = 0, eval_every: int = 50,
                   kind: type[nn.Module] = nn.Sigmoid,
                   on_step: Callable[[int, nn.Module], None] | None = None
                   ) -> dict[str, Any]:
    """:func:`train_classifier`, watching the input of every `kind` module (every sigmoid) on
    the test set at step 0 and every ``every`` steps (:func:`layer_inputs`, training behaviour).

    Returns train_classifier's history plus ``tracker`` (a bncore.tracking.ActivationTracker
    with the per-unit 15th, 50th and 85th percentiles of every layer), ``drift`` (R - 1, L):
    each layer's drift since the previous look, averaged over its units
    (bncore.tracking.drift), and ``inputs``: the last look's arrays, one (N, H) per layer.
    on_step(step, model), if given, is called after every update as well.
    """
    from bncore.tracking import ActivationTracker, drift

    X_probe = as_tensors(split)[2]
    tracker = ActivationTracker()
    drifts: list[list[float]] = []
    previous: list[np.ndarray] = []

    def look(step: int, model: nn.Module) -> None:
        nonlocal previous
        current = layer_inputs(model, X_probe, kind)
        tracker.record(step, current)
        if previous:
            drifts.append([drift(a, b).mean() for a, b in zip(previous, current, strict=True)])
        previous = current

    def each_step(step: int, model: nn.Module) -> None:
        if step % every == 0:
            look(step, model)
        if on_step is not None:
            on_step(step, model)

    look(0, model)
    history: dict[str, Any] = dict(train_classifier(model, split, steps, lr=lr, seed=seed,
                                                   eval_every=eval_every, on_step=each_step))
    history.update(tracker=tracker, drift=np.array(drifts), inputs=previous)
    return history


def format_summary(values: ArrayLike, decimals: int = 1) -> str:
    """'mean ± std [min, max]' over the seeds in ``values`` (1-D), as in the placement tables."""
    s = seed_summary(values)
    return (f"{s['mean']:.{decimals}f} ± {s['std']:.{decimals}f} "
            f"[{s['min']:.{decimals}f}, {s['max']:.{decimals}f}]")


def placement_table(results: dict, placements: tuple = (None, "before", "after"),
                    paired: tuple[str, str] | None = ("after", "before"),
                    decimals: int = 1) -> str:
    """A Markdown table of a placement sweep: one row per placement, one column per net.

    results: {column name: array (P, S)}, e.g. test accuracy in % for each placement and seed
    (``placement_sweep(...)["test_acc"][:, :, -1] * 100``). Each cell is
    'mean ± std [min, max]' over the seeds. With ``paired=(a, b)`` a last row gives the same
    summary of the per-seed differences a − b (the runs of one seed are paired).
    """
    names = {None: "no BN"}
    header = "| placement | " + " | ".join(results) + " |"
    rows = [header, "|" + " --- |" * (len(results) + 1)]
    for i, placement in enumerate(placements):
        cells = [format_summary(np.asarray(acc)[i], decimals) for acc in results.values()]
        rows.append(f"| {names.get(placement, placement)} | " + " | ".join(cells) + " |")
    if paired is not None:
        a, b = (list(placements).index(p) for p in paired)
        cells = [format_summary(np.asarray(acc)[a] - np.asarray(acc)[b], decimals)
                 for acc in results.values()]
        rows.append(f"| {paired[0]} − {paired[1]}, paired | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def steps_to(history: dict, level: float) -> int | None:
    """The first evaluated step at which a :func:`train_classifier` history's test accuracy
    reaches ``level`` (None if it never does)."""
    hit = np.flatnonzero(np.array(history["test_acc"]) >= level)
    return int(history["step"][hit[0]]) if len(hit) else None
