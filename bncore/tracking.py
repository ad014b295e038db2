"""Watching layer inputs while a net trains (chapter 2), in NumPy.

- :func:`percentiles`, :func:`drift`, :func:`saturation_fraction`: summaries of a layer's
  inputs, an array ``z`` of shape (N, H) (N examples, H units), shared by the reading pages.
- :class:`ActivationTracker` and :func:`track_training`: the reference answers of the graded
  notebook (its hidden tests compare a student's code with these).
- :class:`SigmoidMLP`, :func:`train` and :func:`accuracy` come from :mod:`bncore.nets` (the
  net the answers watch); they are importable from here too, for the reading pages.

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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bncore.nets import SigmoidMLP, accuracy, sigmoid, train

if TYPE_CHECKING:
    from bncore.data import Split

__all__ = ["QUANTILES", "SATURATION", "ActivationTracker", "SigmoidMLP", "accuracy", "drift",
           "median_movement", "percentiles", "saturation_fraction", "sigmoid", "track_training",
           "train"]

QUANTILES = (15, 50, 85)  # the percentiles of the batch-norm paper's Figure 1
SATURATION = 0.02  # sigma(z) < 0.02 or > 0.98 counts as saturated, i.e. |z| > log(49) ~ 3.89


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


def median_movement(tracker: ActivationTracker, layer: int) -> np.ndarray:
    """Per unit of ``layer``, how far its median moved over training: the range of the 50th
    percentile divided by the mean 15-85 spread. Needs a tracker of the default quantiles
    (15, 50, 85). Returns (units,)."""
    _, P = tracker.history(layer)  # P: (records, 3 percentiles, units)
    return np.ptp(P[:, 1], axis=0) / (P[:, 2] - P[:, 0]).mean(axis=0)
