"""Valid answers that are not the model's: another formula, loops, einsum, float64 inside, a
library function where the exercise allows one, and answers whose NumPy calls warn. Every one
must get full marks (tests/test_hostile.py grades them next to the hostile corpus), and the
self-check must say so too.

``ALTERNATIVES[assignment]`` maps a student id to ``{answer grade_id: source}``; the answers
not named are the model's.
"""

from __future__ import annotations

from tests.hostile.cases import code

CH1 = {
    "standardizer": code('''
        class Standardizer:
            """Population statistics through the variance; a constant feature found by ptp."""

            def fit(self, X):
                X = np.array(X, dtype=np.float64)
                self.mean_ = X.sum(axis=0) / X.shape[0]
                var = ((X - self.mean_) ** 2).sum(axis=0) / X.shape[0]
                constant = np.ptp(X, axis=0) == 0
                self.mean_ = np.where(constant, X[0], self.mean_)
                self.scale_ = np.where(constant, 1.0, np.sqrt(var))
                return self

            def transform(self, X):
                if getattr(self, "mean_", None) is None:
                    raise ValueError("fit first")
                return (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_

            def inverse_transform(self, Z):
                if getattr(self, "mean_", None) is None:
                    raise ValueError("fit first")
                return np.asarray(Z, dtype=np.float64) * self.scale_ + self.mean_

            def fit_transform(self, X):
                return self.fit(X).transform(X)
    '''),
    "conditioning": code('''
        def hessian(X):
            X = np.asarray(X, dtype=np.float64)
            return np.einsum("ni,nj->ij", X, X) / X.shape[0]


        def condition_number(X):
            singular = np.linalg.svd(np.asarray(X, dtype=np.float64), compute_uv=False)
            return float((singular.max() / singular.min()) ** 2)


        def largest_stable_lr(X):
            return float(2.0 / np.linalg.norm(hessian(X), ord=2))
    '''),
}

CH2 = {
    "tracker": code('''
        class ActivationTracker:
            """Quantiles (0 to 1) instead of percentiles, kept per layer."""

            def __init__(self, q=(15, 50, 85)):
                self.q = tuple(q)
                self.steps = []
                self.by_layer = {}

            def record(self, step, activations):
                self.steps.append(step)
                for layer, z in enumerate(activations):
                    quantiles = np.quantile(np.array(z), np.array(self.q) / 100.0, axis=0)
                    self.by_layer.setdefault(layer, []).append(quantiles)

            def history(self, layer):
                return np.asarray(self.steps, dtype=int), np.array(self.by_layer[layer])
    '''),
    "drift": code('''
        from scipy.stats import wasserstein_distance


        def drift(prev, curr, eps=1e-8):
            return np.array([wasserstein_distance(prev[:, j], curr[:, j])
                             / (np.std(prev[:, j]) + eps) for j in range(prev.shape[1])])
    '''),
}

CH3 = {
    "forward": code('''
        def batchnorm_forward(x, gamma, beta, eps=1e-5):
            """float64 inside, einsum for the statistics, rows stacked one by one."""
            n = x.shape[0]
            x64 = x.astype(np.float64)
            mu = np.einsum("nd->d", x64) / n
            xc = x64 - mu
            var = np.einsum("nd,nd->d", xc, xc) / n
            std = np.sqrt(var + eps)
            stack = getattr(np, "row_stack", np.vstack)  # NumPy 2 warns: deprecated alias
            xhat = stack([row / std for row in xc])
            out = (gamma * xhat + beta).astype(x.dtype)
            return out, {"xhat": xhat, "std": std, "gamma": gamma, "dtype": x.dtype}
    '''),
    "backward": code('''
        def batchnorm_backward(dout, cache):
            """Staged, with loops over the features and the sums written out."""
            xhat, std, gamma = cache["xhat"], cache["std"], cache["gamma"]
            n, d = dout.shape
            dx = np.zeros((n, d))
            dgamma, dbeta = np.zeros(d), np.zeros(d)
            for j in range(d):
                dy = dout[:, j].astype(np.float64)
                dbeta[j] = dy.sum()
                dgamma[j] = (dy * xhat[:, j]).sum()
                dxhat = dy * gamma[j]
                dvar = -0.5 * (dxhat * xhat[:, j]).sum() / std[j] ** 2
                dmu = -dxhat.sum() / std[j]
                dx[:, j] = dxhat / std[j] + dvar * 2 * xhat[:, j] * std[j] / n + dmu / n
            dtype = cache["dtype"]
            return dx.astype(dtype), dgamma.astype(dtype), dbeta.astype(dtype)
    '''),
    "backward_alt": code('''
        def batchnorm_backward_alt(dout, cache):
            xhat, std, gamma = cache["xhat"], cache["std"], cache["gamma"]
            n = dout.shape[0]
            dy = dout.astype(np.float64)
            dbeta = dy.sum(axis=0)
            dgamma = np.einsum("nd,nd->d", dy, xhat)
            dx = gamma / (n * std) * (n * dy - dbeta - xhat * dgamma)
            dtype = cache["dtype"]
            return dx.astype(dtype), dgamma.astype(dtype), dbeta.astype(dtype)
    '''),
}

CH4 = {
    "layer": code('''
        class BatchNorm:
            """Running statistics from the unbiased variance directly; counts first."""

            def __init__(self, num_features, eps=1e-5, momentum=0.1):
                self.num_features = num_features
                self.eps = eps
                self.momentum = momentum
                self.training = True
                self.gamma = np.ones(num_features)
                self.beta = np.zeros(num_features)
                self.running_mean = np.zeros(num_features)
                self.running_var = np.ones(num_features)
                self.num_batches_tracked = 0

            def train(self):
                self.training = True
                return self

            def eval(self):
                self.training = False
                return self

            def forward(self, x):
                unbiased = x.var(axis=0, ddof=1)  # unused in eval mode; warns for one example
                if self.training:
                    if len(x) < 2:
                        raise ValueError("a training batch needs at least two examples")
                    mean, var = x.mean(axis=0), x.var(axis=0)
                    count = self.num_batches_tracked + 1
                    weight = 1 / count if self.momentum is None else self.momentum
                    self.running_mean = self.running_mean + weight * (mean - self.running_mean)
                    self.running_var = self.running_var + weight * (unbiased - self.running_var)
                    self.num_batches_tracked = count
                else:
                    mean, var = self.running_mean, self.running_var
                return (x - mean) * (self.gamma / np.sqrt(var + self.eps)) + self.beta
    '''),
    "fold": code('''
        def fold_linear(W, b, gamma, beta, running_mean, running_var, eps=1e-5):
            scale = np.diag(gamma / np.sqrt(running_var + eps))
            return scale @ W, scale @ (b - running_mean) + beta
    '''),
}

CH5 = {
    "forward": code('''
        def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
            """Through the table: channels last, flattened to (N * H * W, C)."""
            n, c, h, w = x.shape
            table = x.transpose(0, 2, 3, 1).reshape(-1, c)
            mu = table.mean(axis=0)
            var = table.var(axis=0)
            xhat = (table - mu) / np.sqrt(var + eps)
            out = (gamma * xhat + beta).reshape(n, h, w, c).transpose(0, 3, 1, 2)
            return out.astype(x.dtype), (xhat, var, gamma, eps, x.shape)
    '''),
    "backward": code('''
        def spatial_batchnorm_backward(dout, cache):
            xhat, var, gamma, eps, shape = cache
            n, c, h, w = shape
            dy = dout.transpose(0, 2, 3, 1).reshape(-1, c)
            m = dy.shape[0]
            dbeta = dy.sum(axis=0)
            dgamma = (dy * xhat).sum(axis=0)
            dx = gamma / np.sqrt(var + eps) / m * (m * dy - dbeta - xhat * dgamma)
            dx = dx.reshape(n, h, w, c).transpose(0, 3, 1, 2)
            return dx.astype(dout.dtype), dgamma, dbeta
    '''),
    "run_sweep": code('''
        def run_sweep(train_fn, placements, seeds):
            placements, seeds = list(placements), list(seeds)
            results = np.empty((len(placements), len(seeds)))
            for i, placement in enumerate(placements):
                for j, seed in enumerate(seeds):
                    results[i, j] = train_fn(placement, seed)
            return results
    '''),
    "summarize": code('''
        def summarize(results):
            s = results.shape[1]
            mean = results.sum(axis=1) / s
            std = np.sqrt(((results - mean[:, None]) ** 2).sum(axis=1) / (s - 1))
            return {"mean": mean, "std": std, "min": np.sort(results, axis=1)[:, 0],
                    "max": np.sort(results, axis=1)[:, -1]}
    '''),
    "paired_difference": code('''
        def paired_difference(results, i, j):
            diff = [a - b for a, b in zip(results[i], results[j])]
            mean = sum(diff) / len(diff)
            std = (sum((d - mean) ** 2 for d in diff) / (len(diff) - 1)) ** 0.5
            return {"mean": mean, "std": std, "wins": sum(1 for d in diff if d > 0)}
    '''),
}

CH6 = {
    "ln_forward": code('''
        def layernorm_forward(x, gamma, beta, eps=1e-5):
            """Example by example in a loop, float64 inside, a dict for the cache."""
            x64 = np.asarray(x, dtype=np.float64)
            out = np.empty_like(x64)
            xhat = np.empty_like(x64)
            std = np.empty(len(x64))
            for n, row in enumerate(x64):
                std[n] = np.sqrt(np.var(row) + eps)
                xhat[n] = (row - np.mean(row)) / std[n]
                out[n] = gamma * xhat[n] + beta
            return out.astype(x.dtype), {"xhat": xhat, "std": std, "gamma": gamma}
    '''),
    "ln_backward": code('''
        def layernorm_backward(dout, cache):
            """Staged through the graph (variance, then mean), with einsum for the sums."""
            xhat, std, gamma = cache["xhat"], cache["std"][:, None], cache["gamma"]
            dy = dout.astype(np.float64)
            d = dy.shape[1]
            dbeta = np.einsum("nd->d", dy)
            dgamma = np.einsum("nd,nd->d", dy, xhat)
            dxhat = dy * gamma
            xc = xhat * std
            dvar = -0.5 * np.einsum("nd,nd->n", dxhat, xc)[:, None] / std**3
            dmu = -np.einsum("nd->n", dxhat)[:, None] / std
            dx = dxhat / std + dvar * 2 * xc / d + dmu / d
            return dx.astype(dout.dtype), dgamma.astype(dout.dtype), dbeta.astype(dout.dtype)
    '''),
    "gn_forward": code('''
        def groupnorm_forward(x, gamma, beta, G, eps=1e-5):
            """A loop over the groups, slicing consecutive channels; float64 inside."""
            n, c = x.shape[:2]
            k = c // G
            x64 = x.astype(np.float64)
            xhat = np.empty_like(x64)
            std = np.empty((n, G))
            for g in range(G):
                block = x64[:, g * k:(g + 1) * k]
                mean = block.mean(axis=(1, 2, 3), keepdims=True)
                var = block.var(axis=(1, 2, 3), keepdims=True)
                std[:, g] = np.sqrt(var[:, 0, 0, 0] + eps)
                xhat[:, g * k:(g + 1) * k] = (block - mean) / np.sqrt(var + eps)
            out = gamma[:, None, None] * xhat + beta[:, None, None]
            return out.astype(x.dtype), {"xhat": xhat, "std": std, "gamma": gamma, "G": G}
    '''),
    "gn_backward": code('''
        def groupnorm_backward(dout, cache):
            """Through a table with one column per (example, group), as batch norm's backward."""
            xhat, std, gamma, G = cache["xhat"], cache["std"], cache["gamma"], cache["G"]
            n = dout.shape[0]
            dy = dout.astype(np.float64)
            dbeta = dy.sum(axis=(0, 2, 3))
            dgamma = np.einsum("nchw,nchw->c", dy, xhat)
            table = (dy * gamma[:, None, None]).reshape(n * G, -1).T  # (M, N * G)
            xh = xhat.reshape(n * G, -1).T
            m = table.shape[0]
            dtable = (m * table - table.sum(axis=0) - xh * (table * xh).sum(axis=0)) / (
                m * std.reshape(-1))
            dx = dtable.T.reshape(dout.shape)
            return dx.astype(dout.dtype), dgamma.astype(dout.dtype), dbeta.astype(dout.dtype)
    '''),
    "run_sweep": code('''
        import itertools


        def run_sweep(train_fn, norms, batch_sizes, seeds):
            norms, batch_sizes, seeds = list(norms), list(batch_sizes), list(seeds)
            values = [train_fn(*combination)
                      for combination in itertools.product(norms, batch_sizes, seeds)]
            return np.array(values, dtype=float).reshape(len(norms), len(batch_sizes),
                                                         len(seeds))
    '''),
    "paired_gap": code('''
        def paired_gap(results, i, j):
            means, stds = [], []
            for first, second in zip(results[i], results[j]):
                diff = [a - b for a, b in zip(first, second)]
                mean = sum(diff) / len(diff)
                means.append(mean)
                stds.append((sum((d - mean) ** 2 for d in diff) / (len(diff) - 1)) ** 0.5)
            return {"mean": np.array(means), "std": np.array(stds)}
    '''),
}

ALTERNATIVES = {
    "ch1-input-normalization": {"alt_standardizer": CH1},
    "ch2-covariate-shift": {"alt_quantiles": CH2},
    "ch3-forward-backward": {"alt_float64": CH3},
    "ch4-running-statistics": {"alt_layer": CH4},
    "ch5-placement": {"alt_table": CH5},
    "ch6-beyond-the-batch": {"alt_loops": CH6},
}
