"""What the hidden tests use to judge an answer, in the grader's process.

A hidden test computes the expected value with the reference (``bncore.numpy`` and friends, in
the grader's process), calls the student's function through ``nb`` (the answer runs in the
student's kernel; what it returns arrives as plain data), and compares here:

>>> expected, _ = batch_norm_forward(x, gamma, beta, eps=eps)
>>> out, _ = nb.batchnorm_forward(x, gamma, beta, eps)
>>> assert_close("out", out, expected, mistakes=forward_mistakes(x, gamma, beta, eps))

:func:`assert_close` says which common mistake a wrong result matches; the ``*_mistakes``
functions compute those mistakes the way a student would make them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from bncore.channel import Remote
from bngrade.course import SECRET_ENV


def hidden_rng(seed: int) -> np.random.Generator:
    """The generator a hidden test draws its inputs from: seeded by the test's ``seed`` and by
    the course's secret (``BNGRADE_SECRET``, which nbgrader_config.py sets from
    ``.grading/secret``), so that a published repository does not publish the hidden inputs.
    Without a secret, by the seed alone. Grades are reproducible either way."""
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        return np.random.default_rng(seed)
    salt = int.from_bytes(hashlib.sha256(secret.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, salt])


def assert_close(
    name: str,
    actual: Any,
    expected: Any,
    *,
    mistakes: Iterable[tuple[str, Any]] = (),
    rtol: float = 1e-7,
    atol: float = 1e-9,
    hint: str = "",
) -> None:
    """Fail with a message that says what is wrong when ``actual`` does not match ``expected``.

    Checks, in this order: a float array at all, the shape, the dtype (it must be the expected
    one, so float32 in gives float32 out), then the values (``np.allclose(actual, expected,
    rtol, atol)``). When the shape or the values are wrong, ``mistakes`` -- pairs of
    ``(message, wrong_result)``, where ``wrong_result`` is computed the way the mistake would
    compute it -- are tried in order, and the first one that ``actual`` matches (with the same
    tolerances) names the error. ``hint`` is appended to every message.

    >>> assert_close("dgamma", dgamma, expected, mistakes=[
    ...     ("dgamma is summed over the features; sum over the batch (axis 0)", wrong)])
    """
    suffix = f" {hint}" if hint else ""
    expected = np.asarray(expected)
    if isinstance(actual, Remote):
        raise AssertionError(f"{name} is a {actual._type} object, not a NumPy array.{suffix}")
    if actual is None:
        raise AssertionError(f"{name} is None: did you forget to return it?{suffix}")
    try:
        actual = np.asarray(actual)
    except ValueError as error:
        raise AssertionError(f"{name} is not an array ({error}).{suffix}") from None
    if actual.dtype.kind not in "fc":
        raise AssertionError(f"{name} should be a float array, got dtype {actual.dtype}.{suffix}")

    mistakes = list(mistakes)

    def named_mistake() -> str | None:
        for message, wrong in mistakes:
            wrong = np.asarray(wrong)
            if wrong.shape == actual.shape and np.allclose(actual, wrong, rtol=rtol, atol=atol):
                return message
        return None

    if actual.shape != expected.shape:
        reason = named_mistake() or "check which axis you reduce over"
        raise AssertionError(
            f"{name} has shape {actual.shape}, expected {expected.shape}: {reason}.{suffix}"
        )
    if actual.dtype != expected.dtype:
        raise AssertionError(
            f"{name} is {actual.dtype}, expected {expected.dtype} (the input's dtype): keep "
            f"the computation in the input's dtype; don't create float64 arrays, e.g. "
            f"np.zeros(D) without dtype=x.dtype.{suffix}"
        )
    if np.allclose(actual, expected, rtol=rtol, atol=atol):
        return
    message: str | None = named_mistake()
    if message is None and not np.all(np.isfinite(actual)):
        message = "it contains NaN or inf"
    if message is None:
        scale = np.maximum(np.abs(expected), np.abs(actual)).max()
        largest = np.abs(actual - expected).max() / max(float(scale), 1e-300)
        message = f"largest error {largest:.1e} relative to the largest value"
    raise AssertionError(f"{name} is wrong: {message}.{suffix}")


# --- chapter 3: common mistakes in batch norm's forward and backward passes --------------------


def forward_mistakes(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float
                     ) -> list[tuple[str, np.ndarray]]:
    """(message, wrong output) for the usual mistakes in the forward pass of an (N, D) batch."""
    mu, var = x.mean(axis=0), x.var(axis=0)
    xc = x - mu
    xhat = xc / np.sqrt(var + eps)
    mu_f, var_f = x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
    return [
        ("the variance is the unbiased one (divides by N - 1); batch norm normalizes with the "
         "biased batch variance (divide by N)",
         gamma * xc / np.sqrt(x.var(axis=0, ddof=1) + eps) + beta),
        ("eps is added outside the square root; divide by sqrt(var + eps)",
         gamma * xc / (np.sqrt(var) + eps) + beta),
        ("eps is missing; divide by sqrt(var + eps)", gamma * xc / np.sqrt(var) + beta),
        ("the square root is missing; divide by sqrt(var + eps), not by var + eps",
         gamma * xc / (var + eps) + beta),
        ("the statistics are taken over the features (axis 1); batch norm averages over the "
         "batch (axis 0), one mean and variance per feature",
         gamma * (x - mu_f) / np.sqrt(var_f + eps) + beta),
        ("gamma and beta are not applied: out = gamma * xhat + beta", xhat),
        ("gamma and beta are swapped: out = gamma * xhat + beta", beta * xhat + gamma),
        ("beta is not added: out = gamma * xhat + beta", gamma * xhat),
        ("gamma is not applied: out = gamma * xhat + beta", xhat + beta),
    ]


def backward_mistakes(dout: np.ndarray, x: np.ndarray, gamma: np.ndarray, eps: float
                      ) -> dict[str, list[tuple[str, np.ndarray]]]:
    """The usual mistakes in the backward pass, as ``{"dx": [...], "dgamma": [...],
    "dbeta": [...]}`` lists of (message, wrong gradient) for :func:`assert_close`."""
    n = x.shape[0]
    xc = x - x.mean(axis=0)
    std = np.sqrt(x.var(axis=0) + eps)
    xhat = xc / std
    mean_dy, mean_dy_xhat = dout.mean(axis=0), (dout * xhat).mean(axis=0)
    std_u = np.sqrt(x.var(axis=0, ddof=1) + eps)
    xhat_u = xc / std_u
    dx_unbiased = gamma / std_u * (dout - mean_dy - xhat_u * (dout * xhat_u).sum(axis=0) / (n - 1))
    return {
        "dx": [
            ("the term -mean(dy) is missing: every x_k moves the batch mean, so the path "
             "through mu contributes to dx",
             gamma / std * (dout - xhat * mean_dy_xhat)),
            ("the term -xhat * mean(dy * xhat) is missing: every x_k moves the batch variance, "
             "so the path through the variance contributes to dx",
             gamma / std * (dout - mean_dy)),
            ("dx treats the batch mean and variance as constants (dx = gamma / sigma * dy); "
             "they depend on every x_k too",
             gamma / std * dout),
            ("the variance term has the wrong sign",
             gamma / std * (dout - mean_dy + xhat * mean_dy_xhat)),
            ("the factor gamma is missing: out = gamma * xhat + beta, so d(xhat) = gamma * dy",
             (dout - mean_dy - xhat * mean_dy_xhat) / std),
            ("dx is the gradient for the unbiased variance (N - 1); batch norm uses the biased "
             "batch variance (N)",
             dx_unbiased),
        ],
        "dgamma": [
            ("dgamma is summed over the features (axis 1); gamma is shared by the N rows of the "
             "batch, so sum over the batch (axis 0)",
             (dout * xhat).sum(axis=1)),
            ("dgamma is not summed over the batch; gamma is shared by the N rows, so add up "
             "their contributions (sum over axis 0)",
             dout * xhat),
            ("dgamma averages over the batch; add up (sum) the contributions of the N rows",
             (dout * xhat).mean(axis=0)),
            ("dgamma uses x instead of xhat: out = gamma * xhat + beta",
             (dout * x).sum(axis=0)),
        ],
        "dbeta": [
            ("dbeta is summed over the features (axis 1); beta is shared by the N rows of the "
             "batch, so sum over the batch (axis 0)",
             dout.sum(axis=1)),
            ("dbeta is not summed over the batch; beta is shared by the N rows, so add up their "
             "contributions (sum over axis 0)",
             dout),
            ("dbeta averages over the batch; add up (sum) the contributions of the N rows",
             dout.mean(axis=0)),
        ],
    }


