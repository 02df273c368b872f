"""Matplotlib for the tools' figures, on its headless backend (no display on servers or in CI)."""

from __future__ import annotations


def headless_pyplot():
    """``matplotlib.pyplot`` with the Agg backend chosen first."""
    import matplotlib  # deferred: matplotlib is optional (the bench extra) and slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: after choosing the headless backend

    return plt
