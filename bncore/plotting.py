"""One look for every figure in the book: readable sizes, no chart junk."""

from __future__ import annotations

import matplotlib.pyplot as plt

# Colours by role, so "with BN" and "without BN" look the same in every chapter.
COLORS = {"no BN": "#7f7f7f", "BN": "#1f77b4", "before": "#1f77b4", "after": "#d62728",
          "raw": "#d62728", "standardized": "#1f77b4"}


def setup() -> None:
    """Apply the book's matplotlib style. Call once at the top of a page."""
    plt.rcParams.update({
        "figure.figsize": (7.0, 4.0),
        "figure.dpi": 110,
        "savefig.dpi": 110,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "font.size": 11,
        "legend.frameon": False,
    })
