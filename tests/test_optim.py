"""bncore.optim: gradient descent on least squares, against independent computations."""

import numpy as np
import pytest

from bncore import optim


def problem(seed=0, n=60, scales=(1.0, 5.0, 0.3)):
    rng = np.random.default_rng(seed)
    X = optim.add_intercept(rng.normal(1.0, 1.0, size=(n, len(scales))) * scales)
    y = X @ rng.normal(size=X.shape[1]) + 0.1 * rng.normal(size=n)
    return X, y


def test_quadratic_matches_the_mean_squared_error():
    X, y = problem()
    H, g, c = optim.quadratic(X, y)
    w = np.random.default_rng(1).normal(size=X.shape[1])
    assert np.isclose(optim.loss(H, g, c, w), np.sum((X @ w - y) ** 2) / (2 * len(X)))
    np.testing.assert_allclose(H @ w - g, X.T @ (X @ w - y) / len(X), atol=1e-12)


def test_minimizer_matches_lstsq_and_sklearn():
    from sklearn.linear_model import LinearRegression

    X, y = problem()
    w = optim.minimizer(*optim.quadratic(X, y)[:2])
    np.testing.assert_allclose(w, np.linalg.lstsq(X, y, rcond=None)[0], rtol=1e-8)
    fit = LinearRegression().fit(X[:, 1:], y)
    np.testing.assert_allclose(w, np.r_[fit.intercept_, fit.coef_], rtol=1e-8)


def test_condition_number_matches_numpy():
    X, _ = problem()
    H, _, _ = optim.quadratic(X, np.zeros(len(X)))
    assert np.isclose(optim.condition_number(H), np.linalg.cond(H))
    assert optim.condition_number(np.diag([1.0, 0.0])) == float("inf")


@pytest.mark.parametrize("frac", [0.3, 0.5, 0.95])
def test_closed_form_matches_step_by_step(frac):
    X, y = problem()
    H, g, c = optim.quadratic(X, y)
    lr = frac * 2 / np.linalg.eigvalsh(H)[-1]
    w0 = np.random.default_rng(2).normal(size=len(g))
    path = optim.gradient_descent(H, g, lr, 300, w0)
    np.testing.assert_allclose(optim.iterates(H, g, lr, np.arange(301), w0), path,
                               rtol=1e-9, atol=1e-9)
    best = optim.loss(H, g, c, optim.minimizer(H, g))
    np.testing.assert_allclose(optim.excess_loss(H, g, lr, np.arange(301), w0),
                               optim.loss(H, g, c, path) - best, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("tol", [1e-2, 1e-6])
def test_steps_to_tolerance_is_the_first_step_counted(tol):
    X, y = problem(seed=3, scales=(1.0, 2.0))
    H, g, c = optim.quadratic(X, y)
    lr = 1 / np.linalg.eigvalsh(H)[-1]
    steps = optim.steps_to_tolerance(H, g, lr, tol)
    gap = optim.loss(H, g, c, optim.gradient_descent(H, g, lr, steps + 10))
    gap -= optim.loss(H, g, c, optim.minimizer(H, g))
    assert int(np.argmax(gap <= tol * gap[0])) == steps


def test_steps_to_tolerance_is_none_when_unstable_or_capped():
    X, y = problem()
    H, g, _ = optim.quadratic(X, y)
    lam_max = np.linalg.eigvalsh(H)[-1]
    assert optim.steps_to_tolerance(H, g, 2.1 / lam_max, 1e-6) is None
    steps = optim.steps_to_tolerance(H, g, 1 / lam_max, 1e-6)
    assert optim.steps_to_tolerance(H, g, 1 / lam_max, 1e-6, max_steps=steps - 1) is None


@pytest.mark.parametrize("scales", [(1.0, 5.0, 0.3), (100.0, 0.01), (1.0,)])
def test_measured_largest_stable_lr_is_two_over_lambda_max(scales):
    X, y = problem(scales=scales)
    H, g, _ = optim.quadratic(X, y)
    measured = optim.largest_stable_lr(H, g)
    assert measured == pytest.approx(2 / np.linalg.eigvalsh(H)[-1], rel=3e-3)
    assert optim.is_stable(H, g, 0.99 * measured)
    assert not optim.is_stable(H, g, 1.05 * measured)


def test_loss_grid_layout_matches_contour():
    X, y = problem(scales=(1.0,))
    H, g, c = optim.quadratic(X, y)
    w1, w2 = np.linspace(-1, 1, 5), np.linspace(0, 2, 3)
    grid = optim.loss_grid(H, g, c, w1, w2)
    assert grid.shape == (3, 5)
    assert np.isclose(grid[2, 1], optim.loss(H, g, c, np.array([w1[1], w2[2]])))
