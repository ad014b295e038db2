"""A tiny NumPy net for chapter 2's graded notebook, where no torch is needed.

:class:`SigmoidMLP` is the batch-norm paper's MNIST net at the digits' scale (Linear -> [BN] ->
sigmoid, three times, then a Linear), :func:`train` its SGD loop and :func:`accuracy` its test
accuracy. The graded notebook's answers (``bncore.tracking``) watch this net train; this
module holds no answer, so the notebook may import it while it is graded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, computed without overflow for large |z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


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
