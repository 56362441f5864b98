"""Intervals for comparing methods on the same evaluation data.

:func:`paired_log_ratio`: the log-perplexity difference of two models on the *same* windows, with a bootstrap
interval over windows. Pairing removes the variation between windows that both models share (a hard passage is hard
for both), so the interval is far tighter than two separate intervals — it is what can tell 5 % apart.
:func:`mean_stderr`: the mean of per-item scores and its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def paired_log_ratio(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[float] | float, *,
                     n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float | bool]:
    """``log(ppl_a / ppl_b)`` over the same windows (``nll_*``: the summed NLL of each window, ``tokens``: the
    predicted tokens per window) with a percentile bootstrap interval: windows are resampled with replacement
    (``n_boot`` draws, seeded), the statistic is the token-weighted mean NLL difference. ``separated`` is True when
    the interval excludes 0 (a real difference at that level)."""
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired windows needed: two 1-D sequences of the same length ≥ 2, got {a.shape}, {b.shape}")
    t = np.broadcast_to(np.asarray(tokens, dtype=np.float64), a.shape)
    d = a - b
    est = float(d.sum() / t.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boot = d[idx].sum(1) / t[idx].sum(1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"log_ratio": est, "lo": float(lo), "hi": float(hi), "ratio": math.exp(est), "ratio_lo": math.exp(lo),
            "ratio_hi": math.exp(hi), "separated": bool(lo > 0 or hi < 0), "windows": int(len(d))}


def paired_mean_log_ppl(nll_a, nll_b, tokens, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
                        ) -> dict[str, float | bool]:
    """The difference of two methods' mean over settings (e.g. over M) of log perplexity, on the same windows:
    ``nll_*`` are (windows, settings) arrays of summed NLL per window and setting, ``tokens`` the predicted tokens
    per window. The statistic is mean_s [Σ_w a_ws / Σ_w t_w] − mean_s [Σ_w b_ws / Σ_w t_w]; the percentile bootstrap
    resamples windows (the same draw for every setting and both methods, ``n_boot`` draws, seeded). ``separated``:
    the interval excludes 0."""
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.ndim == 1:
        a, b = a[:, None], b[:, None] if b.ndim == 1 else b
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"paired windows needed: two (windows ≥ 2, settings) arrays of one shape, got {a.shape}, "
                         f"{b.shape}")
    t = np.broadcast_to(np.asarray(tokens, dtype=np.float64), a.shape[:1])
    d = a - b
    est = float((d.sum(0) / t.sum()).mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.shape[0], size=(n_boot, d.shape[0]))
    boot = (d[idx].sum(1) / t[idx].sum(1)[:, None]).mean(1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"difference": est, "lo": float(lo), "hi": float(hi), "separated": bool(lo > 0 or hi < 0),
            "windows": int(d.shape[0]), "settings": int(d.shape[1])}


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / √n) of per-item scores."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))


__all__ = ["paired_log_ratio", "paired_mean_log_ppl", "mean_stderr"]
