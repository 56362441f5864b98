"""CBO selection variants, side by side (issue 3): the paper's recipe and the fixes the paper's weaknesses call for.

- ``paper``: Fisher energy xᵀHx, the ground state (and the k lowest).
- ``taylor``: with the first-order term, −gᵀx + ½xᵀHx.
- ``exact``: the exact gate Hessian instead of the Fisher (when it was computed).
- ``protect``: any of the above with the first and last block kept, as most peers do.
- re-ranking (:func:`rerank_states`): measure the K lowest-energy states on *held-out calibration text* (never
  evaluation data) — mean cross-entropy, or KL(dense ‖ pruned) — and pick the best: a rule fixed in advance.
- iterative (:func:`iterative_cbo`): remove a few blocks, recompute A and H on the shrunken model, repeat.
- stochastic depth (``cbo-sd`` in :mod:`cbo_utils.experiments.compare`;
  ``collect_gate_gradients(random_removal=(0, M))``): every gradient row is taken at its own random partial removal of
  0..M blocks, so H = AᵀA/m is the Fisher averaged over the models met on the way to removing M blocks, not only at the
  dense model (α = 1). Why: at α = 1 the late blocks of SmolLM2 have small gate gradients, so the paper's Fisher ranks
  them cheapest, yet removing several of them together is catastrophic (the M = 8 ground state removes 8 of blocks 20–29
  → held-out perplexity > 10⁷). Once some blocks are already gone, the remaining blocks' gradients show how much the
  damaged model relies on them — the same reason iterative methods work, at the cost of one gradient pass.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cbo_utils.calibration import CalibrationSet
from cbo_utils.core.artifacts import format_blocks, parse_blocks, read_json, sidecar_path
from cbo_utils.core.profiles import check_keys
from cbo_utils.gradients import GradientResult, collect_gate_gradients, load_gradients
from cbo_utils.interactions import (
    PAIR_TABLE_MODES,
    PairTable,
    ScreenedTableFile,
    cached_pair_table,
    divergence_of_sets,
    load_pair_table,
    screen_pairs,
)
from cbo_utils.model.loss import calibration_nll
from cbo_utils.problem.energies import energy_gradient
from cbo_utils.problem.ising import BlockRemovalProblem, quadratic_form
from cbo_utils.select.selection import Selection
from cbo_utils.solvers.heuristics import solve
from cbo_utils.solvers.states import states_blocks


def cbo_states(grads: GradientResult, M: int, k: int = 20, energy: str = "fisher", hessian: str = "fisher",
               protect_ends: bool = False, keep: Sequence[int] = (), solver: str = "exact", seed: int = 0,
               **solver_kw) -> pd.DataFrame:
    """The k lowest states of one CBO energy variant (a standard states table; ``attrs['variant']`` names it)."""
    H = grads.H if hessian == "fisher" else grads.H_exact
    if H is None:
        raise ValueError("no exact Hessian in these gradients; collect them with exact_hessian_samples > 0")
    keep = sorted(set(keep) | ({0, grads.N - 1} if protect_ends else set()))
    prob = BlockRemovalProblem.from_hessian(H.numpy(), M, energy_gradient(energy, g=grads.g.numpy()),
                                            energy=energy, keep=keep, block_types=grads.meta.get("block_types"))
    kw = {"progress": False} if solver in ("exact", "auto") else {}
    df = solve(prob, solver=solver, k=k, seed=seed, **kw, **solver_kw)
    df.attrs["variant"] = variant_name(energy, hessian, protect_ends)
    return df


def variant_name(energy: str = "fisher", hessian: str = "fisher", protect_ends: bool = False) -> str:
    name = {"fisher": "cbo-paper"}.get(energy, f"cbo-{energy}")
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
def calibration_scores(model, sets: Sequence[Sequence[int]], samples: CalibrationSet | Sequence[dict],
                       objective: str = "ce", progress: bool = False) -> np.ndarray:
    """Mean per-token score of the gated model (α = 0 on each set) on ``samples``: ``ce`` = next-token
    cross-entropy, ``kl`` = KL(dense ‖ pruned). Lower is better. Shape (len(sets),), float64."""
    from tqdm.auto import tqdm

    if objective not in ("ce", "kl"):
        raise ValueError(f"unknown objective {objective!r}; use 'ce' or 'kl'")
    samples = list(samples)
    if objective == "ce":  # the baselines' calibration NLL: the same token-weighted definition, one implementation

        return np.array([calibration_nll(model, samples, removed=list(b)) for b in
                         tqdm(sets, desc="re-rank (ce)", disable=not progress)], dtype=np.float64)
    return divergence_of_sets(model, samples, sets, objective="kl", batch_size=8)


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
        prob = BlockRemovalProblem.from_hessian(H, m, energy_gradient(energy, g=g), energy=energy,
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


# ----------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class CBOVariant:
    """One CBO selection rule, fixed before any evaluation.

    ``gradients``: ``dense`` — gate gradients at α = 1 (the paper); ``stochastic`` — each row at a random partial
    removal of 0..M blocks (:func:`cbo_utils.gradients.collect_gate_gradients` with ``random_removal=(0, M)``), the
    Fisher averaged over the models met on the way to removing M blocks; ``pairs`` — no gradients: the measured
    pair table (:mod:`cbo_utils.interactions`, KL(dense ‖ pruned) on every set of ≤ 2 blocks) is the energy.
    ``refit_rounds``: >0 = the surrogate-refit loop (:func:`refit_pair_energy`) with ``refit_states`` new states
    measured per round. ``measured_diagonal``: the stochastic-depth Fisher's couplings with the measured single-block
    divergences h_i of the pair table on its diagonal (Q = H/2 off the diagonal, the second-order KL of the step
    α: 1 → 0, and Q_ii = h_i). ``swap_rounds``: >0 = the swap local search on measured KL (:func:`swap_search`) from
    the ground state, ``swap_candidates`` swaps measured per round.
    ``energy``: fisher (xᵀHx) | taylor (−gᵀx + ½xᵀHx). ``hessian``: fisher | exact. ``protect_ends``: keep the
    first and last block. ``rerank``: re-rank the K lowest states by cross-entropy on the held-out calibration
    windows and take the best (0 = ground state). ``iterative_step``: >0 = remove that many blocks at a time and
    recompute the gradients on the shrunken model.
    """

    name: str
    gradients: str = "dense"
    energy: str = "fisher"
    hessian: str = "fisher"
    protect_ends: bool = False
    rerank: int = 0
    objective: str = "ce"
    iterative_step: int = 0
    refit_rounds: int = 0
    refit_states: int = 10
    measured_diagonal: bool = False
    swap_rounds: int = 0
    swap_candidates: int = 6
    description: str = ""

    @property
    def uses_heldout(self) -> bool:
        return self.rerank > 0

    @property
    def uses_fit(self) -> bool:
        """Measures on the fit windows only (the calibration minus the re-ranking windows): the re-ranking variants,
        and every pair variant (they share one pair table)."""
        return self.uses_heldout or self.gradients == "pairs" or self.measured_diagonal


CBO_VARIANTS: dict[str, CBOVariant] = {v.name: v for v in [
    CBOVariant("cbo-paper", description="the paper: Fisher xᵀHx at α = 1, ground state"),
    CBOVariant("cbo-paper-rerank", rerank=20, description="the paper's 20 lowest states re-ranked on held-out "
                                                          "calibration cross-entropy"),
    CBOVariant("cbo-taylor", energy="taylor", description="with the first-order term, −gᵀx + ½xᵀHx"),
    CBOVariant("cbo-exactH", hessian="exact", description="exact gate Hessian instead of the Fisher"),
    CBOVariant("cbo-paper-protect", protect_ends=True, description="paper, first and last block kept"),
    CBOVariant("cbo-iterative", iterative_step=2, protect_ends=True,
               description="2 blocks at a time, gradients recomputed on the shrunken model, ends kept"),
    CBOVariant("cbo-sd", gradients="stochastic", description="stochastic-depth Fisher (gradients at random partial "
                                                             "removals of 0..M blocks), ground state"),
    CBOVariant("cbo-sd-rerank", gradients="stochastic", rerank=20,
               description="stochastic-depth Fisher, 20 lowest re-ranked on held-out calibration cross-entropy"),
    CBOVariant("cbo-pairs", gradients="pairs", energy="pairs",
               description="measured pair energy (KL of every single and pair removal), ground state"),
    CBOVariant("cbo-pairs-rerank", gradients="pairs", energy="pairs", rerank=20, objective="kl",
               description="measured pair energy, 20 lowest re-ranked by KL on held-out calibration windows"),
    CBOVariant("cbo-pairs-refit", gradients="pairs", energy="pairs", refit_rounds=3, refit_states=10,
               description="measured pair energy refit on measured M-sets (3 rounds × 10 states, ridge towards the "
                           "pair table), the lowest measured KL"),
    CBOVariant("cbo-pairs-swap", gradients="pairs", energy="pairs", swap_rounds=4, swap_candidates=6,
               description="measured pair energy's ground state, then a swap local search on measured KL (4 rounds "
                           "× the 6 swaps of lowest pair energy)"),
    CBOVariant("cbo-sd-hdiag-rerank", gradients="stochastic", measured_diagonal=True, rerank=20, objective="kl",
               description="stochastic-depth Fisher couplings with the measured single-block KL on the diagonal, "
                           "20 lowest re-ranked by KL on held-out calibration windows"),
]}


#: The package's default CBO selection: the variant the mini comparison's development rule chose (issue 24: lowest
#: mean log perplexity over M = 4, 8, 15 on the development mixture, never test data; a lead whose paired interval
#: includes 0 is a tie, and a tie goes to the swap search; README "Comparing CBO with the baselines").
DEFAULT_VARIANT = "cbo-pairs-swap"


def get_variant(name: str) -> CBOVariant:
    if name not in CBO_VARIANTS:
        raise ValueError(f"unknown CBO variant {name!r}; choose one of {sorted(CBO_VARIANTS)}")
    return CBO_VARIANTS[name]


# ----------------------------------------------------------------------------------------------- gradients
def variant_gradients(model, calib, out: Path, kind: str, M: int, s: dict, seed: int, exact: int = 0):
    """Cached gate gradients of one kind on ``calib`` (``dense`` or ``stochastic`` for removals of 0..M)."""

    tag = "dense" if kind == "dense" else f"stochastic_M{M}"
    path = out / f"gradients_{tag}_{len(calib)}.safetensors"
    params = {"kind": kind, "M": M if kind != "dense" else None, "calibration_sha256": calib.sha256,
              "points_per_sample": s["points_per_sample"] if kind != "dense" else 1, "seed": seed,
              "exact_hessian_samples": exact, "batch_size": s["batch_size"]}
    if path.is_file() and read_json(sidecar_path(path)).get("parameters") == params:
        return load_gradients(path), path.name
    kw = {}
    if kind != "dense":
        kw = {"random_removal": (0, M), "points_per_sample": s["points_per_sample"], "seed": seed}
    res = collect_gate_gradients(model, calib, batch_size=s["batch_size"], exact_hessian_samples=exact,
                                 checkpoint=out / f"{path.stem}.partial", **kw)
    res.save(path, {"parameters": params})
    return res, path.name


def variant_quadratic_form(v: CBOVariant, path, M: int | None = None) -> tuple[np.ndarray, float]:
    """The ``(Q, const)`` of variant ``v`` from its saved artifact (the gradients file, or the pair table). A screened
    pair table holds the pairs every M measured; with ``M`` (when the file recorded M's candidate set) the form is
    the one M's selection solved — exact within its candidates, the additive estimate elsewhere — else the whole
    file's (exact on every measured pair)."""
    if v.gradients == "pairs":
        table = load_pair_table(path)
        screen = table.meta.get("screens", {}).get(str(M)) if M is not None else None
        return (table.restricted(screen["candidates"]) if screen else table).quadratic_form()
    if v.measured_diagonal:   # "gradients file" + " " + "pair table file", in one folder
        path = Path(path)
        gfile, pfile = path.name.split(" ")
        return measured_diagonal_form(load_gradients(path.parent / gfile).H.numpy(),
                                      load_pair_table(path.parent / pfile)), 0.0
    grads = load_gradients(path)
    H = grads.H if v.hessian == "fisher" else grads.H_exact
    return quadratic_form(H.numpy(), energy_gradient(v.energy, grads.g.numpy()), v.energy)


# ----------------------------------------------------------------------------------------------- selection
def select_cbo_variant(model, calib, heldout, fit, out: Path, v: CBOVariant, M: int, s: dict,
                       seed: int) -> Selection:
    """Run one CBO variant on ``calib`` (``fit``/``heldout``: its gradient and re-ranking parts, used by the variants
    that re-rank); gradients are cached under ``out``. The Selection's ``states`` holds the variant's lowest states,
    its ``meta`` the timings (gradients, solve, re-ranking), the gradients file and a detail note."""

    t0 = time.perf_counter()
    data = fit if v.uses_fit else calib
    if v.iterative_step:
        r = iterative_cbo(model, data, M, step=v.iterative_step, energy=v.energy, protect_ends=v.protect_ends,
                          batch_size=s["batch_size"])
        return Selection(v.name, M, r.removed, seconds=time.perf_counter() - t0, calibration=data.describe(),
                         meta={"gradient_seconds": r.gradient_seconds,
                               "detail": json.dumps([st["added"] for st in r.steps])})
    if v.gradients == "pairs":
        return _select_pairs(model, data, heldout, out, v, M, s, seed, t0)
    grads, gfile = variant_gradients(model, data, out, v.gradients, M, s, seed,
                       exact=s["exact_hessian_samples"] if v.hessian == "exact" else 0)
    grad_s = float(grads.meta.get("seconds_gradients", 0.0)) + float(grads.meta.get("seconds_exact_hessian", 0.0))
    k = max(v.rerank, s["spearman"]["lowest"] if v.name in s["spearman"]["variants"] else 1, 1)
    if v.measured_diagonal:
        table, table_s = _pair_table(model, data, out, s)
        grad_s += table_s
        t1 = time.perf_counter()
        Q = measured_diagonal_form(grads.H.numpy(), table)
        keep = [0, table.N - 1] if v.protect_ends else []
        states = solve(BlockRemovalProblem(Q, M, energy="sd-hdiag", keep=tuple(keep),
                                           block_types=table.meta.get("block_types")), solver="auto", k=k, seed=seed)
        gfile = f"{gfile} {pair_table_file(data, pair_table_mode(s)[0])}"
    else:
        t1 = time.perf_counter()
        states = cbo_states(grads, M, k=k, energy=v.energy, hessian=v.hessian, protect_ends=v.protect_ends,
                            seed=seed, solver="auto")   # tabu beyond EXACT_LIMIT, e.g. M ≥ 16 of Llama-70B's 80 blocks
    solve_s = time.perf_counter() - t1
    best, energy, rerank_s, detail = _pick(model, states, heldout, v, bool(s.get("progress", False)))
    return Selection(v.name, M, best, seconds=grad_s + solve_s + rerank_s, calibration=data.describe(),
                     energy=energy, states=states,
                     meta={"gradient_seconds": grad_s, "solve_seconds": solve_s, "rerank_seconds": rerank_s,
                           "detail": detail, "gradients_file": gfile})


def _pick(model, states: pd.DataFrame, heldout, v: CBOVariant, progress: bool = False
          ) -> tuple[list[int], float, float, str]:
    """The variant's rule on its states table: the ground state, or (``rerank``) the best of the K lowest on the
    held-out windows. Returns (removed blocks, energy, re-ranking seconds, detail)."""
    if not v.rerank:
        return parse_blocks(states.iloc[0]["removed_blocks"]), float(states.iloc[0]["energy"]), 0.0, ""
    rr = rerank_states(model, states, heldout, K=v.rerank, objective=v.objective, progress=progress)
    row = rr.table[rr.table["removed_blocks"] == format_blocks(rr.best)].iloc[0]
    return rr.best, float(row["energy"]), rr.seconds, f"picked energy rank {int(row['rank'])} of {v.rerank}"


def _pairs_problem(table: PairTable, M: int, keep: Sequence[int]) -> BlockRemovalProblem:
    Q, const = table.quadratic_form()
    return BlockRemovalProblem(Q, M, const=const, energy="pairs", keep=tuple(keep),
                               block_types=table.meta.get("block_types"))


def _select_pairs(model, data, heldout, out: Path, v: CBOVariant, M: int, s: dict, seed: int, t0: float
                  ) -> Selection:
    """A pair-energy variant: the pair table on ``data`` (cached under ``out``, one file shared by every M; with
    ``pair_table: screened`` the screened table of :func:`cbo_utils.interactions.screen_pairs`, extended in place
    when an M needs more candidates), its k lowest states, then the variant's refit loop, swap search or re-ranking.

    The states the screening rule covers (every block of them inside the candidates, so their pair energy is exact):
    the k lowest states solved (the re-ranking pool; the ground state that starts the swap search), and for the refit
    its first round's ``refit_states`` lowest states. ``gradient_seconds`` (the measuring charged to the selection):
    the seconds of the table as this selection read it — the full table; for the screened file every measurement it
    holds so far (its singles and every extension, this selection's included; ``measured_seconds`` is what this
    call measured itself)."""
    mode, margin = pair_table_mode(s)
    k = max(v.rerank, s["spearman"]["lowest"] if v.name in s["spearman"]["variants"] else 1, 1)
    k_used = max(k, v.refit_states) if v.refit_rounds else k
    solve_s, extra, holder = 0.0, {}, {}

    def states_used(view: PairTable) -> list[list[int]]:
        nonlocal solve_s
        t = time.perf_counter()
        prob = _pairs_problem(view, M, keep)
        holder["prob"], holder["states"] = prob, solve(prob, solver="auto", k=k_used, seed=seed)
        solve_s += time.perf_counter() - t
        return states_blocks(holder["states"])

    if mode == "full":
        table = _pair_table(model, data, out, s)[0]
        keep = [0, table.N - 1] if v.protect_ends else []
        measure_s = float(table.meta.get("seconds", 0.0))
        states_used(table)
        note = f"full pair table, {table.sets} sets"
    else:
        f = ScreenedTableFile(model, data, out / pair_table_file(data, mode), objective="kl",
                              batch_size=s["batch_size"], screen_margin=margin, progress=bool(s.get("progress", False)))
        keep = [0, f.table.N - 1] if v.protect_ends else []
        sc = screen_pairs(f.table, M, f.measure, states_used, margin=margin, keep=keep)
        f.record(M, sc)
        table, measure_s = sc.table, float(f.table.meta.get("seconds", 0.0))
        N = table.N
        extra = {"pair_candidates": format_blocks(sc.candidates), "screen_rounds": sc.rounds, "pair_sets": sc.sets,
                 "table_sets": f.table.sets, "measured_seconds": round(f.measured_seconds, 3),
                 "measured_sets": f.measured_sets}
        note = (f"screened pair table: {len(sc.candidates)} candidates, {sc.sets} of {N + N * (N - 1) // 2} sets, "
                f"{sc.rounds} solve(s)")
    extra["negative_couplings"] = (table if mode == "full" else f.table).negative_coupling_fraction()
    prob, states = holder["prob"], holder["states"].head(k).reset_index(drop=True)
    if v.refit_rounds:
        t2 = time.perf_counter()
        r = refit_pair_energy(model, data, table, M, rounds=v.refit_rounds, per_round=v.refit_states, keep=keep,
                              batch_size=s["batch_size"], seed=seed)
        best, energy, rerank_s = r["best"], r["best_divergence"], time.perf_counter() - t2
        detail = json.dumps({"measured": len(r["measured"]), "rounds": r["rounds"], "pair_table": note})
    elif v.swap_rounds:
        t2 = time.perf_counter()
        r = swap_search(model, data, prob, parse_blocks(states.iloc[0]["removed_blocks"]), rounds=v.swap_rounds,
                        candidates=v.swap_candidates, batch_size=s["batch_size"])
        best, energy, rerank_s = r["best"], r["best_divergence"], time.perf_counter() - t2
        detail = json.dumps({"measured": len(r["measured"]), "moves": r["moves"], "pair_table": note})
    else:
        best, energy, rerank_s, detail = _pick(model, states, heldout, v, bool(s.get("progress", False)))
        detail = f"{detail}; {note}" if detail else note
    return Selection(v.name, M, best, seconds=measure_s + solve_s + rerank_s, calibration=data.describe(),
                     energy=energy, states=states,
                     meta={"gradient_seconds": measure_s, "solve_seconds": solve_s, "rerank_seconds": rerank_s,
                           "detail": detail, "gradients_file": pair_table_file(data, mode),
                           "prefix_cache": table.meta.get("prefix_cache"), "pair_table": mode, **extra})


def pair_table_mode(s: dict) -> tuple[str, int]:
    """The validated ``pair_table`` (``screened`` | ``full``) and ``screen_margin`` settings of ``s`` (the defaults
    of :data:`CBO_SETTINGS` where absent)."""
    mode = s.get("pair_table", CBO_SETTINGS["pair_table"])
    margin = s.get("screen_margin", CBO_SETTINGS["screen_margin"])
    if mode not in PAIR_TABLE_MODES:
        raise ValueError(f"pair_table must be 'screened' (measure the pairs among the candidate blocks only) or "
                         f"'full' (every pair), got {mode!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"screen_margin must be a non-negative integer (extra candidate blocks beyond M), "
                         f"got {margin!r}")
    return str(mode), int(margin)


def pair_table_file(data, mode: str = "full") -> str:
    """The file name of the KL pair table measured on ``data`` (one per calibration part, shared by every M):
    ``pairs_kl_<n>.safetensors`` for the full table, ``pairs_kl_<n>_screened.safetensors`` for the screened one."""
    if mode not in PAIR_TABLE_MODES:
        raise ValueError(f"pair_table must be one of {PAIR_TABLE_MODES}, got {mode!r}")
    return f"pairs_kl_{len(data)}.safetensors" if mode == "full" else f"pairs_kl_{len(data)}_screened.safetensors"


def _pair_table(model, data, out: Path, s: dict) -> tuple[PairTable, float]:
    """The pair table of the setting ``pair_table`` and its measuring seconds; for the screened file only its
    singles are guaranteed (what ``cbo-sd-hdiag-rerank`` reads), and the seconds are those of its singles."""
    mode, margin = pair_table_mode(s)
    progress = bool(s.get("progress", False))
    if mode == "full":
        t = cached_pair_table(model, data, out / pair_table_file(data, mode), objective="kl",
                              batch_size=s["batch_size"], progress=progress)
        return t, float(t.meta.get("seconds", 0.0))
    f = ScreenedTableFile(model, data, out / pair_table_file(data, mode), objective="kl", batch_size=s["batch_size"],
                          screen_margin=margin, progress=progress)
    runs = f.table.meta.get("runs") or [{"seconds": f.table.meta.get("seconds", 0.0)}]
    return f.table, float(runs[0]["seconds"])


def measured_diagonal_form(H: np.ndarray, table: PairTable) -> np.ndarray:
    """Q of the ``measured_diagonal`` variant: H/2 off the diagonal (xᵀ(H/2)x is the second-order KL of the step
    α: 1 → 0 on the removed blocks, the Fisher being the KL's Hessian) and the measured h_i on it."""
    if H.shape != (table.N, table.N):
        raise ValueError(f"the Fisher is {H.shape[0]}×{H.shape[1]} but the pair table has {table.N} blocks")
    Q = np.asarray(H, dtype=np.float64) / 2.0
    Q[np.diag_indices(table.N)] = table.h
    return Q


def swap_search(model, calibration, prob: BlockRemovalProblem, start: Sequence[int], *, rounds: int = 4,
                candidates: int = 6, batch_size: int = 8) -> dict:
    """Swap local search on measured KL: from ``start``, every round measures D (KL(dense ‖ pruned) on
    ``calibration``) of the ``candidates`` not yet measured swaps (one removed block for one kept, feasible for
    ``prob``) of lowest surrogate energy ``prob.energy`` and moves to the best of them if it lowers the measured D;
    it stops after ``rounds`` rounds or when no measured swap improves. Returns ``best``, ``best_divergence``,
    ``measured`` (set → D) and ``moves`` (the sets moved to)."""
    current = sorted(int(b) for b in start)
    measured = {format_blocks(current): float(divergence_of_sets(model, calibration, [current],
                                                                 batch_size=batch_size)[0])}
    moves = []
    for _ in range(rounds):
        swaps = [sorted([b for b in current if b != out_b] + [in_b]) for out_b in current
                 for in_b in range(prob.N) if in_b not in current]
        swaps = [c for c in swaps if format_blocks(c) not in measured]
        X = np.zeros((len(swaps), prob.N))
        for row, c in enumerate(swaps):
            X[row, c] = 1.0
        ok = prob.feasible(X) if swaps else np.zeros(0, dtype=bool)
        if not ok.any():
            break
        swaps, e = [c for c, f in zip(swaps, ok, strict=True) if f], prob.energy_of(X[ok])
        picked = [swaps[i] for i in np.argsort(e, kind="stable")[:candidates]]
        for c, d in zip(picked, divergence_of_sets(model, calibration, picked, batch_size=batch_size), strict=True):
            measured[format_blocks(c)] = float(d)
        best = min(picked, key=lambda c: measured[format_blocks(c)])
        if measured[format_blocks(best)] >= measured[format_blocks(current)]:
            break
        current = best
        moves.append(format_blocks(current))
    return {"best": current, "best_divergence": measured[format_blocks(current)], "measured": measured,
            "moves": moves}


def refit_pair_energy(model, calibration, table: PairTable, M: int, *, rounds: int = 3, per_round: int = 10,
                      ridge: float = 1.0, keep: Sequence[int] = (), batch_size: int = 8, seed: int = 0) -> dict:
    """The surrogate-refit loop (FMQA / BOCS on the Ising form): measure D of the ``per_round`` lowest not yet
    measured M-sets of the current energy, refit h and J by ridge regression towards the pair table (the prior;
    ``ridge`` is the prior's weight in observations), solve again; after ``rounds`` rounds the rule is the measured
    set of lowest D. Returns ``best``, ``best_divergence``, ``measured`` (set → D) and per-round records."""
    N = table.N
    iu = np.triu_indices(N, 1)
    Q0, const = table.quadratic_form()
    prior = np.concatenate([np.diag(Q0), 2.0 * Q0[iu]])  # θ = (h, J_i<j)
    theta = prior.copy()
    measured: dict[str, float] = {}
    records = []
    for r in range(rounds):
        Q = np.zeros((N, N))
        Q[iu] = theta[N:] / 2.0
        Q = Q + Q.T
        Q[np.diag_indices(N)] = theta[:N]
        prob = BlockRemovalProblem(Q, M, const=const, energy="pairs", keep=tuple(keep))
        states = solve(prob, solver="auto", k=per_round + len(measured), seed=seed)
        new = [b for b in states_blocks(states) if format_blocks(b) not in measured][:per_round]
        if not new:
            break
        for b, d in zip(new, divergence_of_sets(model, calibration, new, batch_size=batch_size), strict=True):
            measured[format_blocks(b)] = float(d)
        sets = [parse_blocks(k) for k in measured]
        X = np.zeros((len(sets), N))
        for row, b in enumerate(sets):
            X[row, b] = 1.0
        Phi = np.concatenate([X, X[:, iu[0]] * X[:, iu[1]]], axis=1)
        y = np.array(list(measured.values())) - const
        theta = prior + np.linalg.solve(Phi.T @ Phi + ridge * np.eye(Phi.shape[1]), Phi.T @ (y - Phi @ prior))
        best_key = min(measured, key=measured.get)
        records.append({"round": r + 1, "new": [format_blocks(b) for b in new], "best": best_key,
                        "best_divergence": measured[best_key]})
    best_key = min(measured, key=measured.get)
    return {"best": parse_blocks(best_key), "best_divergence": measured[best_key], "measured": measured,
            "rounds": records}


#: the settings a CBO variant reads (the comparison's defaults for them; see ``compare.DEFAULTS``)
CBO_SETTINGS: dict[str, Any] = {"rerank_samples": 8, "batch_size": 8, "exact_hessian_samples": 0,
                                "points_per_sample": 2, "pair_table": "screened", "screen_margin": 4,
                                "spearman": {"lowest": 1, "variants": []}, "progress": False}


def select_cbo(model, calibration: CalibrationSet, M: int, variant: str = DEFAULT_VARIANT,
               cache_dir=None, seed: int = 0, **settings) -> Selection:
    """The CBO selection of ``M`` blocks by one variant (default: the package's default, :data:`DEFAULT_VARIANT`) —
    the same code the comparison harness runs. Variants that re-rank hold out the last ``rerank_samples`` windows
    of ``calibration`` and take gradients on the others, as the harness does. Gradients are cached under
    ``cache_dir`` (a temporary folder when None). The pair variants (and ``cbo-sd-hdiag-rerank``'s diagonal) read
    the pair table of the setting ``pair_table``: ``screened`` (the default; :func:`cbo_utils.interactions.screen_pairs`
    with ``screen_margin`` extra candidates) or ``full`` (every pair); another value is a ValueError."""
    v = get_variant(variant)
    s = {**CBO_SETTINGS, **settings}
    check_keys("CBO", settings, CBO_SETTINGS)
    pair_table_mode(s)
    n = len(calibration)
    if v.uses_fit and not 0 < s["rerank_samples"] < n:
        raise ValueError(f"{variant} holds out {s['rerank_samples']} calibration windows: give a calibration set of "
                         f"more than that many samples (got {n}), or set rerank_samples")
    n_fit = n - s["rerank_samples"]
    fit = type(calibration)(calibration.samples[:n_fit], {**calibration.recipe,
                                                          "part": f"windows 0..{n_fit - 1} (gradients)"})
    heldout = type(calibration)(calibration.samples[n_fit:], {**calibration.recipe,
                                                              "part": f"windows {n_fit}..{n - 1} (re-ranking)"})
    if cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return select_cbo_variant(model, calibration, heldout, fit, Path(tmp), v, M, s, seed)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return select_cbo_variant(model, calibration, heldout, fit, Path(cache_dir), v, M, s, seed)
