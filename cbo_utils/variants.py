"""CBO selection variants, side by side (issue 3): the paper's recipe and the fixes the paper's weaknesses call for.

- ``paper``: Fisher energy xᵀHx, the ground state (and the k lowest).
- ``taylor``: with the first-order term, −gᵀx + ½xᵀHx.
- ``exact``: the exact gate Hessian instead of the Fisher (when it was computed).
- ``protect``: any of the above with the first and last block kept, as most peers do.
- re-ranking (:func:`rerank_states`): measure the K lowest-energy states on *held-out calibration text* (never
  evaluation data) — mean cross-entropy, or KL(dense ‖ pruned) — and pick the best: a rule fixed in advance.
- iterative (:func:`iterative_cbo`): remove a few blocks, recompute A and H on the shrunken model, repeat.
- stochastic depth (``cbo-sd`` in :mod:`cbo_utils.compare`; ``collect_gate_gradients(random_removal=(0, M))``):
  every gradient row is taken at its own random partial removal of 0..M blocks, so H = AᵀA/m is the Fisher
  averaged over the models met on the way to removing M blocks, not only at the dense model (α = 1). Why: at
  α = 1 the late blocks of SmolLM2 have small gate gradients, so the paper's Fisher ranks them cheapest, yet
  removing several of them together is catastrophic (the M = 8 ground state removes 8 of blocks 20–29 → held-out
  perplexity > 10⁷). Once some blocks are already gone, the remaining blocks' gradients show how much the damaged
  model relies on them — the same reason iterative methods work, at the cost of one gradient pass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .artifacts import format_blocks, parse_blocks
from .blocks import Gates
from .calibration import CalibrationSet
from .hessian import GradientResult, collect_gate_gradients
from .ising import BlockRemovalProblem
from .models import model_device
from .solvers import solve, states_blocks

ENERGIES = ("fisher", "taylor")


def cbo_states(grads: GradientResult, M: int, k: int = 20, energy: str = "fisher", hessian: str = "fisher",
               protect_ends: bool = False, keep: Sequence[int] = (), solver: str = "exact", seed: int = 0,
               **solver_kw) -> pd.DataFrame:
    """The k lowest states of one CBO energy variant (a standard states table; ``attrs['variant']`` names it)."""
    if energy not in ENERGIES:
        raise ValueError(f"unknown energy {energy!r}; choose one of {ENERGIES}")
    H = grads.H if hessian == "fisher" else grads.H_exact
    if H is None:
        raise ValueError("no exact Hessian in these gradients; collect them with exact_hessian_samples > 0")
    keep = sorted(set(keep) | ({0, grads.N - 1} if protect_ends else set()))
    prob = BlockRemovalProblem.from_hessian(H.numpy(), M, g=grads.g.numpy() if energy == "taylor" else None,
                                            energy=energy, keep=keep, block_types=grads.meta.get("block_types"))
    kw = {"progress": False} if solver == "exact" else {}
    df = solve(prob, solver=solver, k=k, seed=seed, **kw, **solver_kw)
    df.attrs["variant"] = variant_name(energy, hessian, protect_ends)
    return df


def variant_name(energy: str = "fisher", hessian: str = "fisher", protect_ends: bool = False) -> str:
    name = {"fisher": "cbo-paper", "taylor": "cbo-taylor"}[energy]
    if hessian == "exact":
        name += "-exactH"
    return name + ("-protect" if protect_ends else "")


@dataclass
class RerankResult:
    table: pd.DataFrame  # one row per state: rank (energy order), energy, removed_blocks, score, rerank_position
    objective: str
    seconds: float
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> list[int]:
        return parse_blocks(self.table.sort_values(["score", "rank"]).iloc[0]["removed_blocks"])


@torch.no_grad()
def _dense_logprobs(model, samples, dev) -> list[torch.Tensor]:
    out = []
    for s in samples:
        logits = model(input_ids=s["input_ids"][None].to(dev)).logits[0, :-1].float()
        out.append(F.log_softmax(logits, -1).to(torch.bfloat16))  # halves the cache; KL error ≪ differences
    return out


@torch.no_grad()
def calibration_scores(model, sets: Sequence[Sequence[int]], samples: CalibrationSet | Sequence[dict],
                       objective: str = "ce", progress: bool = False) -> np.ndarray:
    """Mean per-token score of the gated model (α = 0 on each set) on ``samples``: ``ce`` = next-token
    cross-entropy, ``kl`` = KL(dense ‖ pruned). Lower is better. Shape (len(sets),), float64."""
    from tqdm.auto import tqdm

    if objective not in ("ce", "kl"):
        raise ValueError(f"unknown objective {objective!r}; use 'ce' or 'kl'")
    samples = list(samples)
    if objective == "ce":  # the baselines' calibration NLL: the same token-weighted definition, one implementation
        from .baselines import calibration_nll

        return np.array([calibration_nll(model, samples, removed=list(b)) for b in
                         tqdm(sets, desc="re-rank (ce)", disable=not progress)], dtype=np.float64)
    dev = model_device(model)
    dense = _dense_logprobs(model, samples, dev)
    scores = np.zeros(len(sets))
    with Gates(model) as gates:
        for j, blocks in enumerate(tqdm(sets, desc=f"re-rank ({objective})", disable=not progress)):
            a = torch.ones(gates.n)
            a[list(blocks)] = 0.0
            gates.alpha = a
            tot, cnt = 0.0, 0
            for i, s in enumerate(samples):
                ids = s["input_ids"][None].to(dev)
                lp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                p_dense = dense[i].to(lp.device).float()
                tot += float((p_dense.exp() * (p_dense - lp)).sum())
                cnt += ids.shape[1] - 1
            scores[j] = tot / cnt
    return scores


def rerank_states(model, states: pd.DataFrame, heldout: CalibrationSet | Sequence[dict], K: int | None = None,
                  objective: str = "ce", progress: bool = True) -> RerankResult:
    """Re-rank the K lowest-energy states by a measured loss on held-out *calibration* text; the predeclared rule
    is: take the state with the lowest score (ties → lower energy rank)."""
    t0 = time.perf_counter()
    top = states.sort_values("rank").head(K or len(states)).copy()
    sets = states_blocks(top)
    top["score"] = calibration_scores(model, sets, heldout, objective, progress)
    top["rerank_position"] = top["score"].rank(method="first").astype(int) - 1
    calib = heldout.describe() if isinstance(heldout, CalibrationSet) else {"samples": len(heldout)}
    return RerankResult(top.reset_index(drop=True), objective, time.perf_counter() - t0, calib)


@dataclass
class IterativeResult:
    removed: list[int]
    steps: list[dict]
    seconds: float
    gradient_seconds: float = 0.0


def iterative_cbo(model, calibration: CalibrationSet, M: int, step: int = 2, energy: str = "fisher",
                  protect_ends: bool = False, progress: bool = False, batch_size: int = 1) -> IterativeResult:
    """Remove ``step`` blocks at a time: gate gradients on the current (gated) model, the ground state of the
    chosen energy over the remaining blocks, repeat until M are removed. Indices are 0-based original ones."""
    if step < 1:
        raise ValueError("step must be at least 1")
    t0 = time.perf_counter()
    removed: list[int] = []
    steps = []
    grad_s = 0.0
    while len(removed) < M:
        grads = collect_gate_gradients(model, calibration, removed=removed, progress=progress, batch_size=batch_size)
        grad_s += float(grads.meta["seconds_gradients"])
        N = grads.N
        kept = [i for i in range(N) if i not in removed]
        sub = np.ix_(kept, kept)
        H = grads.H.numpy()[sub]
        g = grads.g.numpy()[kept]
        keep_local = [kept.index(b) for b in (0, N - 1) if protect_ends and b in kept]
        m = min(step, M - len(removed))
        prob = BlockRemovalProblem.from_hessian(H, m, g=g if energy == "taylor" else None, energy=energy,
                                                keep=keep_local)
        best = states_blocks(solve(prob, "exact", k=1, progress=False))[0]
        new = [kept[i] for i in best]
        removed = sorted(removed + new)
        steps.append({"added": new, "removed": list(removed), "mean_loss": grads.meta["mean_loss"]})
    return IterativeResult(removed, steps, time.perf_counter() - t0, grad_s)


# ------------------------------------------------------------------------------------------------- analysis
def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 0-based."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's ρ (Pearson correlation of average ranks); NaN when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"spearman needs two 1-D sequences of the same length ≥ 2, got {a.shape} and {b.shape}")
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def random_feasible_sets(N: int, M: int, n: int, seed: int = 0, keep: Sequence[int] = ()) -> list[list[int]]:
    """``n`` distinct uniformly random M-subsets of the blocks not in ``keep`` (seeded)."""
    rng = np.random.default_rng(seed)
    free = np.array([i for i in range(N) if i not in set(keep)])
    out: set[str] = set()
    res = []
    from math import comb

    n = min(n, comb(len(free), M))
    while len(res) < n:
        s = sorted(rng.choice(free, size=M, replace=False).tolist())
        key = format_blocks(s)
        if key not in out:
            out.add(key)
            res.append(s)
    return res
