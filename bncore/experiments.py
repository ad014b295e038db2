"""Small, seeded training experiments shared by the reading pages (PyTorch, CPU).

The nets are tiny (digits is 1797 images of 8x8), so every experiment runs in seconds on two
cores. Each function seeds its own generator: the same arguments give the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from bncore.data import Split
from bncore.pages import markdown_table

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
                     on_step: Callable[[int, nn.Module], None] | None = None
                     ) -> dict[str, list[Any]]:
    """Train with cross-entropy and plain SGD on random mini-batches (sampled with replacement
    across steps).

    on_step(step, model) is called after every update, for recording activations.
    Returns {"step": [...], "test_acc": [...], "train_loss": [...]} with one entry per
    evaluation (every ``eval_every`` steps, and at step 0).
    """
    gen = seed_everything(seed)
    X_train, y_train, X_test, y_test = as_tensors(split, image=image)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = nn.CrossEntropyLoss()
    history: dict[str, list[Any]] = {"step": [0], "test_acc": [accuracy(model, X_test, y_test)],
                                     "train_loss": [np.nan]}
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(X_train), (batch_size,), generator=gen)
        loss = loss_fn(model(X_train[idx]), y_train[idx])
        # Plain SGD written out: the update torch.optim.SGD makes (p.add_(grad, alpha=-lr)),
        # without its bookkeeping, which costs these tiny nets a fifth of their step.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.add_(g, alpha=-lr)
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
    The seeds of a placement are trained side by side as one stack (:class:`StackedMLP`,
    :class:`StackedCNN`, :func:`train_stack`), in which each net follows the updates it would
    follow alone, as ``train_classifier(model, split, steps, lr=lr, seed=seed)`` trains it.
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
        for placement in placements:   # one stack each: a stack of one kind of net is faster
            members = [Member(norm=None if placement is None else "bn",
                              placement=placement or "before", seed=seed, lr=lr)
                       for seed in seeds]
            model = (StackedMLP(sizes, members, activation) if arch == "mlp"
                     else StackedCNN(members, channels, activation=activation))
            history = train_stack(model, split, steps, eval_every=eval_every,
                                  score_train=False)
            acc.append(history["test_acc"])
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
    rows = [[names.get(placement, placement),
             *(format_summary(np.asarray(acc)[i], decimals) for acc in results.values())]
            for i, placement in enumerate(placements)]
    if paired is not None:
        a, b = (list(placements).index(p) for p in paired)
        rows.append([f"{paired[0]} − {paired[1]}, paired",
                     *(format_summary(np.asarray(acc)[a] - np.asarray(acc)[b], decimals)
                       for acc in results.values())])
    return markdown_table(["placement", *results], rows)


def steps_to(history: dict, level: float) -> int | None:
    """The first evaluated step at which a :func:`train_classifier` history's test accuracy
    reaches ``level`` (None if it never does)."""
    hit = np.flatnonzero(np.array(history["test_acc"]) >= level)
    return int(history["step"][hit[0]]) if len(hit) else None


# --- Many small nets trained as one: a stack (chapters 2, 5 and 6) ---------------------------
#
# Training one of these tiny nets is mostly Python and dispatch overhead, so seeds and variants
# are trained together: a stack of S nets is one module in which member s owns its own block
# of every layer (batched matrix products, grouped convolutions, its own normalization) and
# sees its own mini-batches. Nothing is shared between members: each one follows exactly the
# updates it would follow alone (tests/test_stack.py checks this against train_classifier).

NORMS = (None, "bn", "ln", "gn", "syncbn")
PLACEMENTS = ("before", "after")


@dataclass(frozen=True)
class Member:
    """One net of a stack.

    norm: None (none), "bn" (batch norm), "ln" (layer norm), "gn" (group norm) or "syncbn"
        (bncore.torch.SyncBatchNorm), after every hidden Linear or convolution.
    placement: where the normalization sits: "before" the activation (Linear -> norm ->
        activation, as :func:`mlp` with ``bn="before"``) or "after" it (Linear -> activation
        -> norm).
    seed: the initial weights are those of the single net built after torch.manual_seed(seed)
        (:func:`mlp`, :func:`small_cnn`), and the mini-batches those of
        train_classifier(..., seed=seed): members with one seed start alike and see the same
        batches (they are paired).
    lr: its SGD learning rate.
    init_gain: None keeps torch's default initialization; a number g (or one per layer)
        draws every weight from N(0, g^2 / fan_in) and zeroes the biases (:func:`gaussian_init_`
        is g = 1). Fully connected stacks only.
    dropout: the probability of dropping each hidden unit in training (after the activation).
        Fully connected stacks only.
    ghost: with norm="bn", normalize each group of this many consecutive examples of a batch
        with its own statistics (ghost batch norm; see :class:`GhostBatchNorm`).
    """

    norm: str | None = None
    placement: str = "before"
    seed: int = 0
    lr: float = 0.1
    init_gain: float | tuple[float, ...] | None = None
    dropout: float = 0.0
    ghost: int | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if self.ghost is not None and (self.norm != "bn" or self.ghost < 2):
            raise ValueError(f"ghost needs norm='bn' and at least 2 examples, got {self}")


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm for (N, C, *) input of any rank. With ``ghost=g``, training normalizes each
    group of g consecutive examples with that group's own mean and variance ("ghost batch
    norm", Hoffer et al., 2017): the noise of batch norm at batch size g, whatever the batch
    size of the gradient step. The running statistics follow the whole batch, so evaluation is
    the same as plain batch norm's. N must be a multiple of g; ghost=None (or g >= N) is
    ordinary batch norm.
    """

    def __init__(self, num_features: int, ghost: int | None = None, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.ghost = ghost

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected input of shape (N, C, *), got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, g = x.shape[0], self.ghost
        if not self.training or g is None or g >= n:
            return super().forward(x)
        if n % g:
            raise ValueError(f"a batch of {n} cannot be cut into ghost batches of {g}")
        self._check_input_dim(x)
        c, rest = x.shape[1], x.shape[2:]
        # (N, C, *) -> (g, N/g * C, *): one "channel" per (ghost batch, channel) pair
        groups = x.reshape(n // g, g, c, *rest).transpose(0, 1).reshape(g, n // g * c, *rest)
        y = nn.functional.batch_norm(groups, None, None, training=True, eps=self.eps)
        y = y.reshape(g, n // g, c, *rest).transpose(0, 1).reshape(x.shape)
        if self.track_running_stats:
            assert self.num_batches_tracked is not None  # registered: track_running_stats
            with torch.no_grad():  # the running statistics of the whole batch
                self.num_batches_tracked.add_(1)
                factor = (self.momentum if self.momentum is not None
                          else 1.0 / self.num_batches_tracked.item())
                nn.functional.batch_norm(x.detach(), self.running_mean, self.running_var,
                                         training=True, momentum=factor, eps=self.eps)
        if self.affine:
            view = (1, c) + (1,) * len(rest)
            y = y * self.weight.view(view) + self.bias.view(view)
        return y


def _norm_layer(norm: str, ghost: int | None, members: int, channels: int,
                groups: int) -> nn.Module:
    """The normalization of `members` consecutive member blocks of `channels` channels."""
    width = members * channels
    if norm == "bn":
        return GhostBatchNorm(width, ghost=ghost)
    if norm == "syncbn":
        from bncore.torch import SyncBatchNorm

        return SyncBatchNorm(width)
    if norm == "ln":
        return nn.GroupNorm(members, width)  # one group per member: all its channels
    if channels % groups:
        raise ValueError(f"group norm with {groups} groups needs a multiple of {groups} "
                         f"channels, got {channels}")
    return nn.GroupNorm(members * groups, width)


def _runs(keys: Sequence[Any]) -> list[tuple[Any, int, int]]:
    """The runs of equal consecutive ``keys``: (key, index of its first, length)."""
    runs: list[tuple[Any, int, int]] = []
    for i, key in enumerate(keys):
        if runs and runs[-1][0] == key:
            runs[-1] = (key, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((key, i, 1))
    return runs


class StackNorm(nn.Module):
    """The normalization layer of a stack at one placement: input (B, S*C, *), member s's
    channels are s*C ... s*C + C - 1, each member whose Member.placement is ``placement``
    normalized as its Member.norm says, the others (and norm None) unchanged.
    Each run of consecutive members of one kind shares one module over their channels, which
    normalizes each member's channels on their own (batch norm is per channel; group norm's
    groups never straddle two members)."""

    def __init__(self, members: Iterable[Member], channels: int, groups: int = 4,
                 placement: str = "before") -> None:
        super().__init__()
        # (kind, first member, number of members); kind is (norm, ghost)
        runs = _runs([(m.norm, m.ghost) if m.placement == placement else (None, None)
                      for m in members])
        self.runs = [(first * channels, count * channels) for _, first, count in runs]
        self.parts = nn.ModuleList(
            nn.Identity() if norm is None else _norm_layer(norm, ghost, count, channels, groups)
            for (norm, ghost), _, count in runs)

    @staticmethod
    def of(members: Sequence[Member], channels: Sequence[int], groups: int = 4,
           placement: str = "before") -> nn.ModuleList | None:
        """One StackNorm per hidden layer (of ``channels[l]`` channels) at ``placement``, or
        None where no member normalizes there."""
        if all(m.norm is None or m.placement != placement for m in members):
            return None
        return nn.ModuleList(StackNorm(members, c, groups, placement) for c in channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0](x)
        return torch.cat([layer(x.narrow(1, start, width))
                          for layer, (start, width) in zip(self.parts, self.runs, strict=True)],
                         dim=1)


def _linear_init(sizes: Sequence[int], seed: int, gain: float | tuple[float, ...] | None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The Linear layers of mlp(sizes) built after torch.manual_seed(seed), re-drawn from
    N(0, gain^2 / fan_in) with zero biases when gain is given (one gain, or one per layer)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    if gain is not None:
        gains = tuple(gain) if isinstance(gain, (tuple, list)) else (gain,) * len(layers)
        if len(gains) != len(layers):
            raise ValueError(f"need one gain per layer ({len(layers)}), got {gains}")
        for layer, g in zip(layers, gains, strict=True):
            gaussian_init_(layer, g * layer.weight.shape[1] ** -0.5)
    return [layer.weight.detach().T for layer in layers], [layer.bias.detach() for layer in layers]


class StackedMLP(nn.Module):
    """S fully connected nets, one per Member, as :func:`mlp` with ``bn=member.placement``
    where a member normalizes: (Linear -> [norm] -> activation -> [norm] -> [dropout]) per
    hidden layer, the norm before or after the activation, then a Linear.
    Input (B, S, sizes[0]): row b of member s is member s's example; output logits
    (B, S, sizes[-1]). Building it draws from torch's global generator (see Member.seed)."""

    def __init__(self, sizes: Sequence[int], members: Iterable[Member],
                 activation: str = "relu") -> None:
        super().__init__()
        self.members, self.sizes = tuple(members), tuple(sizes)
        inits = [_linear_init(sizes, m.seed, m.init_gain) for m in self.members]
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([w[l] for w, _ in inits]))
                                        for l in range(len(sizes) - 1))  # (S, in, out)
        self.biases = nn.ParameterList(nn.Parameter(torch.stack([b[l] for _, b in inits]))
                                       for l in range(len(sizes) - 1))   # (S, out)
        self.norms = StackNorm.of(self.members, sizes[1:-1])
        self.norms_after = StackNorm.of(self.members, sizes[1:-1], placement="after")
        self.activation = ACTIVATIONS[activation]()
        # runs of consecutive members with one dropout probability: (first, count, p)
        self.dropout_runs = [(first, count, p)
                             for p, first, count in _runs([m.dropout for m in self.members])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s = x.shape[:2]
        h = x
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b[:, None, :], h.transpose(0, 1), w).transpose(0, 1)
            if layer == last:
                return h
            if self.norms is not None:
                h = self.norms[layer](h.reshape(n, -1)).view(n, s, -1)
            h = self.activation(h)
            if self.norms_after is not None:
                h = self.norms_after[layer](h.reshape(n, -1)).view(n, s, -1)
            if self.training and any(p for _, _, p in self.dropout_runs):
                h = torch.cat([_dropout(h.narrow(1, first, count), p)
                               for first, count, p in self.dropout_runs], dim=1)
        return h


def _dropout(h: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of h with probability p (p = 0: h itself); masks only where needed,
    since drawing random numbers costs more than the rest of a step of these nets."""
    if p == 0:
        return h
    return h * (torch.rand_like(h) >= p).to(h.dtype) / (1.0 - p)


def _bias(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """The bias of a layer built with one (torch's default), which torch types as optional."""
    assert layer.bias is not None
    return layer.bias


class StackedCNN(nn.Module):
    """S two-convolution nets, one per Member, as :func:`small_cnn` with
    ``bn=member.placement`` where a member normalizes: (conv3x3 -> [norm] -> activation ->
    [norm] -> max-pool 2x2) twice, the norm before or after the activation, then a Linear.
    Input (B, S, 64) (8x8 digits); output logits (B, S, 10). Group norm uses ``groups``
    groups per layer. Building it draws from torch's global generator (see Member.seed)."""

    def __init__(self, members: Iterable[Member], channels: tuple[int, int] = (8, 16),
                 groups: int = 4, n_classes: int = 10, activation: str = "relu") -> None:
        super().__init__()
        self.members, self.channels = tuple(members), tuple(channels)
        if any(m.init_gain is not None or m.dropout for m in self.members):
            raise ValueError("StackedCNN keeps torch's initialization and has no dropout")
        s, (c1, c2) = len(self.members), self.channels
        nets = []
        for m in self.members:
            torch.manual_seed(m.seed)   # the draws of small_cnn(channels), in its order
            nets.append((nn.Conv2d(1, c1, 3, padding=1), nn.Conv2d(c1, c2, 3, padding=1),
                         nn.Linear(c2 * 4, n_classes)))
        self.conv1 = nn.Conv2d(s, s * c1, 3, padding=1, groups=s)
        self.conv2 = nn.Conv2d(s * c1, s * c2, 3, padding=1, groups=s)
        with torch.no_grad():
            for k, conv in enumerate((self.conv1, self.conv2)):
                conv.weight.copy_(torch.cat([net[k].weight for net in nets]))
                _bias(conv).copy_(torch.cat([_bias(net[k]) for net in nets]))
        self.head_weight = nn.Parameter(torch.stack([net[2].weight.detach().T for net in nets]))
        self.head_bias = nn.Parameter(torch.stack([net[2].bias.detach() for net in nets]))
        self.norms = StackNorm.of(self.members, channels, groups)
        self.norms_after = StackNorm.of(self.members, channels, groups, placement="after")
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s = x.shape[:2]
        h = x.reshape(n, s, 8, 8)
        for layer, conv in enumerate((self.conv1, self.conv2)):
            h = conv(h)
            if self.norms is not None:
                h = self.norms[layer](h)
            h = self.activation(h)
            if self.norms_after is not None:
                h = self.norms_after[layer](h)
            # channels-last: several times faster on CPU for these small maps; same values
            h = nn.functional.max_pool2d(h.contiguous(memory_format=torch.channels_last), 2)
        h = h.reshape(n, s, -1).transpose(0, 1)  # (S, B, c2 * 4)
        return torch.baddbmm(self.head_bias[:, None, :], h, self.head_weight).transpose(0, 1)


@torch.no_grad()
def stack_scores(model: StackedMLP | StackedCNN, X: torch.Tensor,
                 y: torch.Tensor) -> dict[str, np.ndarray]:
    """Every member's accuracy and mean cross-entropy on (X, y) in eval mode: {"acc": (S,),
    "loss": (S,)} as NumPy arrays. The model's mode is restored."""
    was_training = model.training
    model.eval()
    logits = model(X[:, None].expand(-1, len(model.members), *X.shape[1:]))
    model.train(was_training)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       y.repeat_interleave(len(model.members)),
                                       reduction="none").view(len(y), -1).mean(0)
    acc = (logits.argmax(-1) == y[:, None]).float().mean(0)
    return {"acc": acc.numpy(), "loss": loss.numpy()}


# One gradient per parameter of a stack; None where the loss does not reach the parameter.
Gradients = list[torch.Tensor | None]


def train_stack(model: StackedMLP | StackedCNN, split: Split, steps: int, batch_size: int = 60,
                eval_every: int = 50, part: slice | None = None,
                average_gradients: Callable[[Gradients], Gradients] | None = None,
                score_train: bool = True) -> dict[str, Any]:
    """Train every member of a stack (:class:`StackedMLP`, :class:`StackedCNN`) by plain SGD,
    each at its own learning rate, on its own mini-batches (drawn as train_classifier draws
    them for the member's seed), for ``steps`` steps.

    part: use only these rows of each batch of ``batch_size`` (one process's share in data
    parallelism); average_gradients(grads) -> grads, if given, is applied to the list of
    gradients before each update (e.g. an all-reduce over the processes).

    Returns {"step": [...], "test_acc": (S, T), "train_loss": (S, T): the mini-batch loss at
    each evaluation (NaN at step 0), and "final": stack_scores on the train and on the test
    set at the end, as {"train_acc", "train_loss", "test_acc", "test_loss"} (S,) arrays; the
    train entries only with score_train=True}.
    """
    X_train, y_train, X_test, y_test = as_tensors(split)
    members = model.members
    seeds = sorted({m.seed for m in members})
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    row = torch.tensor([seeds.index(m.seed) for m in members])
    lr = torch.tensor([m.lr for m in members])
    params = list(model.parameters())
    history: dict[str, list[Any]] = {
        "step": [0], "test_acc": [stack_scores(model, X_test, y_test)["acc"]],
        "train_loss": [np.full(len(members), np.nan)]}
    model.train()
    for step in range(1, steps + 1):
        drawn = torch.stack([torch.randint(len(X_train), (batch_size,), generator=g)
                             for g in generators])
        idx = drawn[row].T  # (B, S): member s's batch in column s
        if part is not None:
            idx = idx[part]
        logits = model(X_train[idx])
        losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             y_train[idx].reshape(-1),
                                             reduction="none").view(idx.shape).mean(0)
        # one backward for all: member s's parameters only see lr_s * loss_s
        grads: Gradients = list(torch.autograd.grad((lr * losses).sum(), params, allow_unused=True))
        if average_gradients is not None:
            grads = average_gradients(grads)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.sub_(g)
        if step % eval_every == 0 or step == steps:
            history["step"].append(step)
            history["test_acc"].append(stack_scores(model, X_test, y_test)["acc"])
            history["train_loss"].append(losses.detach().numpy())
    test = stack_scores(model, X_test, y_test)
    final = {"test_acc": test["acc"], "test_loss": test["loss"]}
    if score_train:
        train = stack_scores(model, X_train, y_train)
        final.update(train_acc=train["acc"], train_loss=train["loss"])
    return {"step": history["step"], "test_acc": np.stack(history["test_acc"], axis=1),
            "train_loss": np.stack(history["train_loss"], axis=1), "final": final}


# --- reporting results over seeds --------------------------------------------------------

def mean_std(values: ArrayLike, decimals: int = 1, scale: float = 1.0) -> str:
    """'mean ± std' of values over the seeds (sample std, ddof=1), e.g. '98.4 ± 0.3'.
    NaN and inf (a diverged run) count as they are, so a column of them shows 'nan'."""
    v = scale * np.asarray(values, dtype=float)
    std = v.std(ddof=1) if v.size > 1 else 0.0
    return f"{v.mean():.{decimals}f} ± {std:.{decimals}f}"


class Table:
    """A small table of results: HTML in the book (a real <table>), aligned text elsewhere.

    >>> Table(["rate", "no BN"], [["0.1", "96.1 ± 0.3"]], caption="Test accuracy (%)")
    """

    def __init__(self, header: Iterable[object], rows: Iterable[Iterable[object]],
                 caption: str = "") -> None:
        self.header = [str(h) for h in header]
        self.rows = [[str(cell) for cell in row] for row in rows]
        if any(len(row) != len(self.header) for row in self.rows):
            raise ValueError("every row needs one cell per column of the header")
        self.caption = caption

    def _repr_html_(self) -> str:
        from html import escape

        head = "".join(f"<th>{escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                       for row in self.rows)
        caption = f"<caption>{escape(self.caption)}</caption>" if self.caption else ""
        return (f'<table class="table bn-results">{caption}<thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>")

    def __repr__(self) -> str:
        widths = [max(len(r[i]) for r in [self.header, *self.rows])
                  for i in range(len(self.header))]
        lines = [self.caption] if self.caption else []
        for row in [self.header, *self.rows]:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        return "\n".join(lines)


def largest_working(values: Sequence[float], results: ArrayLike,
                    threshold: float) -> list[float | None]:
    """For every seed, the largest value (of a sweep) at which results >= threshold.

    values: (V,) the swept values, increasing; results: (V, S) one result per value and seed.
    Returns S entries: a value, or None when no value reaches the threshold.
    """
    results = np.asarray(results, dtype=float)
    out = []
    for seed in range(results.shape[1]):
        ok = [v for v, r in zip(values, results[:, seed], strict=True) if r >= threshold]
        out.append(max(ok) if ok else None)
    return out


# --- data parallelism on one machine (chapter 6): the functions each process runs ----------

def _average_over_processes(grads: Gradients) -> Gradients:
    """All-reduce a list of gradients (None allowed) and divide by the number of processes,
    as DistributedDataParallel does, in one message."""
    import torch.distributed as dist

    present = [g for g in grads if g is not None]
    flat = torch.cat([g.reshape(-1) for g in present])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out: Gradients = []
    offset = 0
    for g in grads:
        if g is None:
            out.append(None)
            continue
        out.append(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return out


def data_parallel_training(rank: int, world_size: int, sizes: Sequence[int],
                           members: Iterable[Member], steps: int, per_process: int,
                           eval_every: int = 50) -> dict[str, Any] | None:
    """Run in each of world_size processes (bncore.distributed.run_on_local_processes):
    train a :class:`StackedMLP` of ``members`` in data parallel. Every step draws the same
    batch of world_size * per_process examples in every process (the members' seeds); process
    r trains on rows r * per_process ... (r + 1) * per_process - 1 of it, and the gradients
    are averaged over the processes before each update, so the weights stay identical
    everywhere. A member with norm "bn" normalizes with its process's rows only, one with
    "syncbn" with the whole batch. Returns train_stack's history in process 0 (evaluated with
    process 0's running statistics, as DistributedDataParallel's buffers are) and None in
    the others.
    """
    from bncore.data import digits

    model = StackedMLP(sizes, members)
    part = slice(rank * per_process, (rank + 1) * per_process)
    history = train_stack(model, digits(), steps, batch_size=world_size * per_process,
                          eval_every=eval_every, part=part,
                          average_gradients=_average_over_processes, score_train=False)
    return history if rank == 0 else None


def sync_batchnorm_check(rank: int, world_size: int, sizes: Sequence[int],
                         seed: int = 0) -> dict[str, Any]:
    """Run in each of world_size processes: one training step of a small float64
    net whose BatchNorm1d is converted to SyncBatchNorm. Process `rank` takes
    sizes[rank] of the first sum(sizes) digits; its loss is the summed
    cross-entropy of its rows. Returns its outputs, input gradients, parameter
    gradients and running statistics as NumPy arrays."""
    from bncore.torch import SyncBatchNorm

    net = SyncBatchNorm.convert_sync_batchnorm(small_bn_net(seed))
    X, y = first_digits(sum(sizes))
    mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    x = X[mine].clone().requires_grad_()
    out = net(x)
    nn.functional.cross_entropy(out, y[mine], reduction="sum").backward()
    return {"out": out.detach().numpy(), "dx": _grad(x),
            "grad": {name: _grad(p) for name, p in net.named_parameters()},
            "running_mean": net.get_buffer("1.running_mean").numpy(),
            "running_var": net.get_buffer("1.running_var").numpy()}


def _grad(t: torch.Tensor) -> np.ndarray:
    """t.grad as a NumPy array, after a backward pass that reached t."""
    assert t.grad is not None
    return t.grad.numpy()


def small_bn_net(seed: int = 0) -> nn.Sequential:
    """Linear(64, 32) -> BatchNorm1d -> ReLU -> Linear(32, 10), float64, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 10)).double()


def first_digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n training digits, X (n, 64) float64 and y (n,): the batch of
    :func:`sync_batchnorm_check`."""
    from bncore.data import digits

    split = digits()
    return (torch.as_tensor(split.X_train[:n], dtype=torch.float64),
            torch.as_tensor(split.y_train[:n]))


def data_parallel_demo(rank: int, world_size: int, check: dict, training: dict) -> dict:
    """Both experiments of the SyncBatchNorm page in one start of the processes:
    {"check": sync_batchnorm_check(rank, world_size, **check),
    "training": data_parallel_training(rank, world_size, **training)}."""
    return {"check": sync_batchnorm_check(rank, world_size, **check),
            "training": data_parallel_training(rank, world_size, **training)}
