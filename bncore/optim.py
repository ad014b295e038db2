"""Gradient descent on least squares: the model problem of chapter 1 (NumPy only).

The loss of a linear model ``X @ w`` fitted to targets ``y`` by least squares is the quadratic

    L(w) = ||X w - y||^2 / (2N) = w^T H w / 2 - g^T w + c,
    H = X^T X / N,   g = X^T y / N,   c = y^T y / (2N),

so its gradient is ``H w - g`` and its Hessian is exactly ``H``. Every function here works on the
triple ``(H, g, c)`` from :func:`quadratic`: a step costs a (D, D) product, whatever N is.

Shapes: N examples, D parameters (features, plus one if an intercept column is added).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def add_intercept(X: np.ndarray) -> np.ndarray:
    """Prepend a column of ones. X: (N, D) -> (N, D + 1); w[0] is then the intercept."""
    X = np.asarray(X, dtype=np.float64)
    return np.column_stack([np.ones(len(X)), X])


def quadratic(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The least-squares loss as a quadratic.

    X: (N, D) inputs, y: (N,) targets.
    Returns (H, g, c): H = X^T X / N of shape (D, D), g = X^T y / N of shape (D,), c = y.y / (2N),
    so that L(w) = w.H.w / 2 - g.w + c.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(X)
    return X.T @ X / n, X.T @ y / n, float(y @ y) / (2 * n)


def loss(H: np.ndarray, g: np.ndarray, c: float, w: np.ndarray) -> np.ndarray:
    """L(w) for w of shape (D,) (returns a scalar) or (..., D) (returns shape (...))."""
    w = np.asarray(w, dtype=np.float64)
    return 0.5 * np.einsum("...i,ij,...j->...", w, H, w) - w @ g + c


def minimizer(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The least-squares solution w* of shape (D,): H w* = g (a pseudo-inverse if H is singular)."""
    return np.linalg.lstsq(H, g, rcond=None)[0]


def condition_number(H: np.ndarray) -> float:
    """lambda_max / lambda_min of the symmetric matrix H (D, D); inf if H is singular."""
    eig = np.linalg.eigvalsh(H)
    return float(eig[-1] / eig[0]) if eig[0] > 0 else float("inf")


def gradient_descent(H: np.ndarray, g: np.ndarray, lr: float, steps: int,
                     w0: np.ndarray | None = None) -> np.ndarray:
    """Plain gradient descent, w <- w - lr (H w - g), one step at a time.

    Returns the trajectory of shape (steps + 1, D): row t holds w_t, row 0 is w0 (zeros by default).
    """
    w = np.zeros(len(g)) if w0 is None else np.array(w0, dtype=np.float64)
    path = np.empty((steps + 1, len(g)))
    path[0] = w
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, steps + 1):
            w = w - lr * (H @ w - g)
            path[t] = w
    return path


def excess_loss(H: np.ndarray, g: np.ndarray, lr: float, steps: ArrayLike,
                w0: np.ndarray | None = None) -> np.ndarray:
    """L(w_t) - L(w*) after t gradient-descent steps, in closed form, for every t in ``steps``.

    On a quadratic, gradient descent acts on each eigenvector q_i of H (eigenvalue lam_i)
    separately: the error component (w_t - w*).q_i is multiplied by (1 - lr lam_i) at every step,
    so L(w_t) - L* = sum_i lam_i e_i^2 (1 - lr lam_i)^(2t) / 2 with e_i = (w0 - w*).q_i.
    This is what :func:`gradient_descent` computes, without running billions of steps.

    steps: integer array of any shape. Returns float64 of the same shape.
    """
    lam, Q = np.linalg.eigh(H)
    w0 = np.zeros(len(g)) if w0 is None else np.asarray(w0, dtype=np.float64)
    e = Q.T @ (w0 - minimizer(H, g))
    t = np.asarray(steps, dtype=np.float64)[..., None]
    with np.errstate(over="ignore"):
        return 0.5 * np.sum(lam * e**2 * np.abs(1.0 - lr * lam) ** (2 * t), axis=-1)


def iterates(H: np.ndarray, g: np.ndarray, lr: float, steps: ArrayLike,
             w0: np.ndarray | None = None) -> np.ndarray:
    """The gradient-descent iterate w_t in closed form, for every t in ``steps`` (shape (T,)).

    w_t = w* + Q diag((1 - lr lam)^t) Q^T (w0 - w*), with H = Q diag(lam) Q^T: the same points
    as :func:`gradient_descent`, for step counts far too large to run. Returns (T, D).
    """
    lam, Q = np.linalg.eigh(H)
    w_star = minimizer(H, g)
    w0 = np.zeros(len(g)) if w0 is None else np.asarray(w0, dtype=np.float64)
    e = Q.T @ (w0 - w_star)
    t = np.asarray(steps, dtype=np.float64)[:, None]
    return w_star + ((1.0 - lr * lam) ** t * e) @ Q.T


def steps_to_tolerance(H: np.ndarray, g: np.ndarray, lr: float, tol: float,
                       w0: np.ndarray | None = None, max_steps: int = 10**15) -> int | None:
    """The first step t at which gradient descent's excess loss has fallen to ``tol`` times its
    starting value: L(w_t) - L* <= tol (L(w0) - L*).

    Uses :func:`excess_loss` (the excess loss never increases at a stable lr, so the first
    such t is found by doubling, then bisection). Returns None if it is not reached within
    ``max_steps`` (for instance because lr >= 2 / lambda_max).
    """
    gap0 = excess_loss(H, g, lr, 0, w0)

    def done(t: int) -> bool:
        return bool(excess_loss(H, g, lr, t, w0) <= tol * gap0)

    if done(0):
        return 0
    hi = 1
    while not done(hi):
        if hi > max_steps:
            return None
        hi *= 2
    lo = hi // 2  # not done at lo (or lo == 0, checked above)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if done(mid) else (mid, hi)
    return hi if hi <= max_steps else None


def is_stable(H: np.ndarray, g: np.ndarray, lr: float, steps: int = 4000,
              w0: np.ndarray | None = None) -> bool:
    """Run ``steps`` steps of gradient descent and report whether the loss ended below where it
    started (False if it grew or overflowed). A measurement: no eigenvalues are used."""
    w = np.zeros(len(g)) if w0 is None else np.array(w0, dtype=np.float64)
    start = loss(H, g, 0.0, w)
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            w = w - lr * (H @ w - g)
        end = loss(H, g, 0.0, w)
    return bool(np.isfinite(end) and end < start)


def largest_stable_lr(H: np.ndarray, g: np.ndarray, steps: int = 4000, rtol: float = 1e-3,
                      w0: np.ndarray | None = None) -> float:
    """Measure the largest learning rate at which gradient descent does not diverge, by
    bisection on :func:`is_stable` (doubling or halving from lr = 1 to bracket it first).

    For a quadratic the answer is 2 / lambda_max(H); this function finds it by running
    gradient descent only. Returns the largest lr found stable, within a relative ``rtol``.
    """
    lo = hi = 1.0
    if is_stable(H, g, 1.0, steps, w0):
        while is_stable(H, g, hi, steps, w0):
            lo, hi = hi, hi * 2.0
    else:
        while not is_stable(H, g, lo, steps, w0):
            lo, hi = lo / 2.0, lo
    while hi / lo > 1.0 + rtol:
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if is_stable(H, g, mid, steps, w0) else (lo, mid)
    return float(lo)


def loss_grid(H: np.ndarray, g: np.ndarray, c: float, w1: np.ndarray,
              w2: np.ndarray) -> np.ndarray:
    """The loss of a two-parameter problem on a grid, for contour plots.

    H: (2, 2), g: (2,), w1: (A,) values of the first weight, w2: (B,) of the second.
    Returns (B, A), laid out as ``plt.contour(w1, w2, grid)`` expects.
    """
    W1, W2 = np.meshgrid(w1, w2)
    return loss(H, g, c, np.stack([W1, W2], axis=-1))
