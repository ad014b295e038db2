"""Watching layer inputs while a net trains (chapter 2), in NumPy.

- :func:`percentiles`, :func:`drift`, :func:`saturation_fraction`: summaries of a layer's
  inputs, an array ``z`` of shape (N, H) (N examples, H units), shared by the reading pages.
- :class:`ActivationTracker` and :func:`track_training`: the reference answers of the graded
  notebook (its hidden tests compare a student's code with these).
- :class:`SigmoidMLP` and :func:`train`: a tiny NumPy version of the batch-norm paper's MNIST
  net (Linear -> [BN] -> sigmoid, three times, then a Linear), so that the graded notebook
  needs no torch.
- :func:`tracking_forbidden`: fails if the reference answers above run inside it.

Drift, precisely. For one unit, let ``a`` and ``b`` be its inputs on the same N probe examples
at two moments of training. The drift is the 1-Wasserstein distance between the two empirical
distributions, in units of the earlier standard deviation:

    drift(a, b) = mean_i |a_(i) - b_(i)| / (std(a) + eps),

where ``a_(i)`` is the i-th smallest value of ``a`` (for two samples of equal size, W1 is the
mean absolute difference of the sorted samples) and std is the biased (ddof=0) one. It is 0
when the distribution did not move, and 1 when it moved by as much as its own spread (a shift of
the whole distribution by one standard deviation gives exactly 1). It compares distributions,
not examples: shuffling ``b``'s rows does not change it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bncore.data import Split

QUANTILES = (15, 50, 85)  # the percentiles of the batch-norm paper's Figure 1
SATURATION = 0.02  # sigma(z) < 0.02 or > 0.98 counts as saturated, i.e. |z| > log(49) ~ 3.89


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, computed without overflow for large |z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# --- summaries of one layer's inputs ---------------------------------------------------------

def percentiles(z: np.ndarray, q: Sequence[float] = QUANTILES) -> np.ndarray:
    """Per-unit percentiles of a layer's inputs.

    z: (N, H) inputs of H units on N examples; q: percentiles in [0, 100].
    Returns (len(q), H): row k holds every unit's q[k]-th percentile over the N examples
    (NumPy's default linear interpolation).
    """
    return np.percentile(np.asarray(z, dtype=float), q, axis=0)


def drift(prev: np.ndarray, curr: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Per-unit drift between two snapshots of a layer's inputs on the same probe batch.

    prev, curr: (N, H). Returns (H,): the 1-Wasserstein distance between unit j's values in
    prev and in curr, divided by (the biased std of prev[:, j]) + eps. See the module docstring.
    """
    prev, curr = np.asarray(prev, dtype=float), np.asarray(curr, dtype=float)
    if prev.shape != curr.shape or prev.ndim != 2:
        raise ValueError(f"need two (N, H) arrays of one shape, got {prev.shape} and {curr.shape}")
    w1 = np.abs(np.sort(prev, axis=0) - np.sort(curr, axis=0)).mean(axis=0)
    return w1 / (prev.std(axis=0) + eps)


def saturation_fraction(z: np.ndarray, threshold: float = SATURATION) -> float:
    """Fraction of the entries of z (sigmoid inputs) with sigma(z) < threshold or
    sigma(z) > 1 - threshold: there the sigmoid's slope is below threshold * (1 - threshold)."""
    s = sigmoid(np.asarray(z, dtype=float))
    return float(np.mean((s < threshold) | (s > 1.0 - threshold)))


# --- the graded notebook's reference answers -------------------------------------------------

class ActivationTracker:
    """Records per-unit percentiles of every layer's inputs over training.

    >>> tracker = ActivationTracker()
    >>> tracker.record(0, [z1, z2])          # z_l: (N, H_l) inputs of layer l at step 0
    >>> steps, P = tracker.history(1)        # steps: (T,), P: (T, len(q), H_2)
    """

    def __init__(self, q: Sequence[float] = QUANTILES):
        self.q = tuple(q)
        self.steps: list[int] = []
        self._records: list[list[np.ndarray]] = []  # one (len(q), H_l) array per layer per step

    def record(self, step: int, activations: Sequence[np.ndarray]) -> None:
        """Store, for each layer's (N, H_l) array, the per-unit percentiles at this step."""
        self.steps.append(int(step))
        self._records.append([percentiles(z, self.q) for z in activations])

    def history(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps (T,), percentiles (T, len(q), H)) of one layer, in the order recorded."""
        if not self._records:
            raise ValueError("nothing recorded yet")
        return np.array(self.steps), np.stack([r[layer] for r in self._records])


def track_training(net: SigmoidMLP, data: Split, steps: int, every: int = 10, lr: float = 0.5,
                   seed: int = 0) -> dict[str, Any]:
    """Train net on data (a bncore.data.Split) and watch its sigmoid inputs on the test set.

    Training: ``train(net, data.X_train, data.y_train, steps, lr=lr, seed=seed, on_step=...)``.
    At step 0 (before training) and at every step that is a multiple of ``every``, on the probe
    batch X_probe = data.X_test, in training behaviour (``net.forward(X_probe)``, then
    ``net.z``): record the percentiles of every layer with an :class:`ActivationTracker`, the
    test accuracy, and (from the second record on) each layer's mean drift over its units since
    the previous record.

    Returns {"step": (R,) ints, "test_acc": (R,), "tracker": ActivationTracker with R records,
    "drift": (R - 1, L)}, L the number of hidden layers.
    """
    tracker = ActivationTracker()
    test_acc: list[float] = []
    drifts: list[list[float]] = []
    previous: list[np.ndarray] = []

    def watch(step: int, net: SigmoidMLP) -> None:
        nonlocal previous
        if step % every:
            return
        net.forward(data.X_test)
        current = [z.copy() for z in net.z]
        tracker.record(step, current)
        test_acc.append(accuracy(net, data.X_test, data.y_test))
        if previous:
            drifts.append([float(drift(a, b).mean()) for a, b in zip(previous, current,
                                                                       strict=True)])
        previous = current

    watch(0, net)
    train(net, data.X_train, data.y_train, steps, lr=lr, seed=seed, on_step=watch)
    return {"step": np.array(tracker.steps), "test_acc": np.array(test_acc), "tracker": tracker,
            "drift": np.array(drifts).reshape(-1, net.n_hidden)}


# --- a tiny NumPy net: Linear -> [BN] -> sigmoid, ..., Linear ------------------------------

def median_movement(tracker: ActivationTracker, layer: int) -> np.ndarray:
    """Per unit of ``layer``, how far its median moved over training: the range of the 50th
    percentile divided by the mean 15-85 spread. Needs a tracker of the default quantiles
    (15, 50, 85). Returns (units,)."""
    _, P = tracker.history(layer)  # P: (records, 3 percentiles, units)
    return np.ptp(P[:, 1], axis=0) / (P[:, 2] - P[:, 0]).mean(axis=0)


class SigmoidMLP:
    """A fully connected net with sigmoid hidden layers and, optionally, batch norm before
    each sigmoid (Linear -> BN -> sigmoid), as in the batch-norm paper's MNIST experiment.

    sizes: [in, hidden..., out]. Weights W[l] (in, out) ~ N(0, 1/in), biases 0; with bn,
    gamma = 1, beta = 0, running_mean = 0, running_var = 1 (momentum 0.1, eps 1e-5, as torch).

    - ``forward(X, train=True)`` -> logits (N, out). It sets ``z``: the sigmoid inputs of every
      hidden layer, a list of (N, H) arrays. train=True uses the batch's statistics,
      train=False the running ones. Forward changes no parameter and no running statistic.
    - ``train_step(X, y, lr)`` -> loss: forward, backward, one SGD step, and the update of the
      running statistics.
    """

    def __init__(self, sizes: Sequence[int] = (64, 100, 100, 100, 10), bn: bool = False,
                 seed: int = 0, momentum: float = 0.1, eps: float = 1e-5):
        rng = np.random.default_rng(seed)
        self.sizes, self.bn, self.momentum, self.eps = tuple(sizes), bool(bn), momentum, eps
        self.n_hidden = len(sizes) - 2
        pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
        self.W = [rng.normal(0.0, fan_in ** -0.5, (fan_in, fan_out)) for fan_in, fan_out in pairs]
        self.b = [np.zeros(fan_out) for _, fan_out in pairs]
        hidden = sizes[1:-1]
        self.gamma = [np.ones(h) for h in hidden] if bn else []
        self.beta = [np.zeros(h) for h in hidden] if bn else []
        self.running_mean = [np.zeros(h) for h in hidden] if bn else []
        self.running_var = [np.ones(h) for h in hidden] if bn else []
        self.z: list[np.ndarray] = []
        self._cache: list[tuple] = []

    def forward(self, X: np.ndarray, train: bool = True) -> np.ndarray:
        h = np.asarray(X, dtype=float)
        self.z, self._cache = [], []
        for l in range(self.n_hidden):
            a = h @ self.W[l] + self.b[l]
            xhat = mean = var = None
            if self.bn:
                mean, var = (a.mean(0), a.var(0)) if train else (self.running_mean[l],
                                                                 self.running_var[l])
                xhat = (a - mean) / np.sqrt(var + self.eps)
                z = self.gamma[l] * xhat + self.beta[l]
            else:
                z = a
            self._cache.append((h, xhat, mean, var))
            self.z.append(z)
            h = sigmoid(z)
        self._cache.append((h,))
        return h @ self.W[-1] + self.b[-1]

    def train_step(self, X: np.ndarray, y: np.ndarray, lr: float) -> float:
        logits = self.forward(X, train=True)
        n = len(y)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -log_p[np.arange(n), y].mean()
        dout = np.exp(log_p)
        dout[np.arange(n), y] -= 1.0
        dout /= n
        (h,) = self._cache[-1]
        grads_W, grads_b = [h.T @ dout], [dout.sum(0)]
        dh = dout @ self.W[-1].T
        grads_gamma: list[np.ndarray] = []
        grads_beta: list[np.ndarray] = []
        for l in reversed(range(self.n_hidden)):
            h_in, xhat, _, var = self._cache[l]
            s = sigmoid(self.z[l])
            dz = dh * s * (1.0 - s)
            if self.bn:
                grads_gamma.insert(0, (dz * xhat).sum(0))
                grads_beta.insert(0, dz.sum(0))
                dxhat = dz * self.gamma[l]
                da = (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0)) / np.sqrt(
                    var + self.eps)
            else:
                da = dz
            grads_W.insert(0, h_in.T @ da)
            grads_b.insert(0, da.sum(0))
            dh = da @ self.W[l].T
        self.grads = {"W": grads_W, "b": grads_b, "gamma": grads_gamma, "beta": grads_beta}
        for params, grads in ((self.W, grads_W), (self.b, grads_b), (self.gamma, grads_gamma),
                              (self.beta, grads_beta)):
            for p, g in zip(params, grads, strict=True):
                p -= lr * g
        if self.bn:
            for l in range(self.n_hidden):
                _, _, mean, var = self._cache[l]
                m = self.momentum
                self.running_mean[l] = (1 - m) * self.running_mean[l] + m * mean
                self.running_var[l] = (1 - m) * self.running_var[l] + m * var * n / (n - 1)
        return float(loss)


def accuracy(net: SigmoidMLP, X: np.ndarray, y: np.ndarray) -> float:
    """Classification accuracy in inference mode (running statistics)."""
    return float(np.mean(net.forward(X, train=False).argmax(1) == y))


def train(net: SigmoidMLP, X: np.ndarray, y: np.ndarray, steps: int, batch_size: int = 60,
          lr: float = 0.5, seed: int = 0,
          on_step: Callable[[int, SigmoidMLP], None] | None = None) -> np.ndarray:
    """Plain SGD on random mini-batches (drawn with replacement across steps, seeded).

    on_step(step, net) is called after every update (step = 1, ..., steps).
    Returns the training loss of every step, (steps,).
    """
    rng = np.random.default_rng(seed)
    losses = np.empty(steps)
    # The matrices are tiny: extra BLAS threads only fight over the cores.
    with _one_blas_thread():
        for step in range(1, steps + 1):
            idx = rng.integers(0, len(X), batch_size)
            losses[step - 1] = net.train_step(X[idx], y[idx], lr)
            if on_step is not None:
                on_step(step, net)
    return losses


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, change nothing
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# --- grading: the reference answers must not run inside a student's answer ------------------

# The reference answers of chapter 2's graded notebook. This file also holds the net and the
# training loop that the answers must use, so the grader forbids these functions, not the file.
REFERENCE_ANSWERS = (percentiles, drift, track_training, ActivationTracker.__init__,
                     ActivationTracker.record, ActivationTracker.history)


def tracking_forbidden(what: str = "your answer") -> contextlib.AbstractContextManager[Any]:
    """``bncore.grading.reference_forbidden`` that also forbids this module's reference answers
    (percentiles, drift, ActivationTracker, track_training); SigmoidMLP, train and accuracy stay
    allowed. Raises ``bncore.grading.ReferenceCalled``.

    >>> with tracking_forbidden("drift"):
    ...     d = drift(prev, curr)
    """
    from bncore.grading import reference_forbidden

    return reference_forbidden(what, functions=REFERENCE_ANSWERS)
