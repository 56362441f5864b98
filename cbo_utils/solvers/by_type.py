"""Exact k-lowest states under per-type budgets: single types by the exact enumeration, mixes by the cartesian
product of the per-type combinations (chunked, float64).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from cbo_utils.core.artifacts import (
    parse_blocks,
)
from cbo_utils.problem.budgets import type_budget_problem
from cbo_utils.solvers.exact import CANDIDATE_CAP, MARGIN, TopK, exact_lowest, set_sums
from cbo_utils.solvers.states import check_k, results_frame


def _product_lowest(Q: np.ndarray, factors: list[np.ndarray], K: int, chunk_elems: int, bar=None
                    ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Approximate energies and index sets of the ~K lowest states of the cartesian product of ``factors``.

    ``factors[t]`` is a ``(n_t, m_t)`` array of absolute block-index subsets of one type. The largest factor is the
    column side (its subsets as 0/1 rows over that type's blocks), the product of the others the row side (mixed-radix
    unranked in chunks); a block of energies is ``E_rows + E_cols + 2·F_rows·1_colsᵀ`` (one matmul), with
    ``F_rows = Σ_{i∈rows} Q[i, column blocks]``. Blocks hold at most ``chunk_elems`` energies, so memory is bounded.
    """

    ci = int(np.argmax([f.shape[0] for f in factors]))
    col = factors[ci]
    rest = [f for j, f in enumerate(factors) if j != ci]
    col_blocks = np.unique(col)
    pos = np.searchsorted(col_blocks, col)
    ind = np.zeros((col.shape[0], col_blocks.size))
    ind[np.arange(col.shape[0])[:, None], pos] = 1.0
    E_col = set_sums(Q, col)
    radices = [f.shape[0] for f in rest]
    n_rows = math.prod(radices)  # 1 when there is a single factor
    m_total = col.shape[1] + sum(f.shape[1] for f in rest)
    scale = float(np.abs(Q).max()) * max(1, m_total) ** 2 + 1e-300
    tol = 1e-10 * scale
    top = TopK(K, tol)
    col_tile = max(1, min(col.shape[0], chunk_elems))
    row_step = max(1, chunk_elems // col_tile)
    n_blocks = 0
    for r0 in range(0, n_rows, row_step):
        r1 = min(n_rows, r0 + row_step)
        if rest:
            digits = np.unravel_index(np.arange(r0, r1, dtype=np.int64), radices)
            R = np.concatenate([f[d] for f, d in zip(rest, digits, strict=True)], axis=1)
        else:
            R = np.zeros((r1 - r0, 0), dtype=np.int64)
        E_row = set_sums(Q, R)
        F_row = np.zeros((R.shape[0], col_blocks.size))
        for a in range(R.shape[1]):
            F_row += Q[np.ix_(R[:, a], col_blocks)]
        for c0 in range(0, col.shape[0], col_tile):
            c1 = min(col.shape[0], c0 + col_tile)
            blk = E_row[:, None] + E_col[None, c0:c1] + 2.0 * (F_row @ ind[c0:c1].T)
            n_blocks += 1
            flat = blk.reshape(-1)
            kk = min(K, flat.size)
            kth = float(np.partition(flat, kk - 1)[kk - 1])
            cut = min(kth, top.thr) + tol
            hit = np.flatnonzero(flat <= cut)
            if hit.size > CANDIDATE_CAP:  # only on huge plateaus of equal energies
                hit = hit[np.argpartition(flat[hit], CANDIDATE_CAP - 1)[:CANDIDATE_CAP]]
                top.truncated = True
            if hit.size:
                hr, hc = np.divmod(hit, c1 - c0)
                sets = np.sort(np.concatenate([R[hr], col[c0 + hc]], axis=1), axis=1)
                top.add(flat[hit], sets)
                if top.count >= K and not np.isfinite(top.thr):
                    top.prune()
            if bar is not None:
                bar.update(flat.size)
    vals, sets = top.result()
    info = {"column_type_index": ci, "n_row_combinations": n_rows, "n_blocks": n_blocks,
            "candidates": int(vals.size), "candidates_truncated": top.truncated}
    return vals, sets, info


def exact_lowest_by_type(Q_or_H, block_types: Sequence[str], budget: Mapping[str, int] | str, k: int = 20,
                         const: float = 0.0, energy: str = "fisher", keep: Iterable[int] = (), *,
                         method: str = "auto", chunk_elems: int = 2 ** 22, max_states: int = 10 ** 9,
                         progress: bool = False) -> pd.DataFrame:
    """The ``k`` lowest-energy states of ``xᵀQx + const`` that remove exactly ``budget[t]`` blocks of each type
    ``t`` (and none of ``keep``), found by complete enumeration (exact up to float64 rounding).

    ``method="auto"``: a single-type budget is :class:`~cbo_utils.problem.ising.BlockRemovalProblem` with ``only_types``
    solved by :func:`cbo_utils.solvers.exact.exact_lowest`; a mixed budget enumerates the cartesian product of the
    per-type combinations (:func:`_product_lowest`: chunked numpy matmuls, float64, memory bounded by
    ``chunk_elems``). ``method="product"`` uses the product enumerator for single-type budgets too. More than
    ``max_states`` states raise a ``ValueError`` that gives the count.

    Returns the solvers' table (``rank, energy, removed_blocks, solver="exact", seed, feasible, tie``; energies
    recomputed exactly as ``xᵀQx + const``) with ``attrs["solver_info"]`` recording the budget, its label, the
    number of states per type and in total, and timings.
    """
    from tqdm.auto import tqdm


    k = check_k(k)
    if method not in ("auto", "product"):
        raise ValueError(f"method must be 'auto' or 'product', got {method!r}")
    prob = type_budget_problem(Q_or_H, block_types, budget, const=const, energy=energy, keep=keep)
    n_states = prob.n_states
    if n_states > max_states:
        raise ValueError(f"the budget {prob.label} has {n_states:,} feasible states ({prob.per_type_states}), more "
                         f"than max_states = {max_states:,}: enumeration would take too long. Use a smaller budget, "
                         "raise max_states, or solve the single-type sub-problems with a heuristic solver "
                         "(cbo_utils.solvers.heuristics.tabu on BlockRemovalProblem(only_types=...))")
    t0 = time.perf_counter()
    budget_info = {"budget": dict(prob.budget), "budget_label": prob.label, "per_type_states": prob.per_type_states,
                   "n_states": n_states, "n_states_total": n_states}
    if method == "auto" and len(prob.budget) == 1:
        df = exact_lowest(prob.base, k=k, chunk_elems=chunk_elems, progress=progress)
        df.attrs["solver_info"].update(budget_info, method="single-type exact_lowest (only_types)")
    else:
        factors = [np.array(list(itertools.combinations(prob.candidates[t].tolist(), c)), dtype=np.int64)
                   .reshape(-1, c) for t, c in prob.budget.items()]
        with tqdm(total=n_states, unit="state", unit_scale=True, disable=not progress, desc="exact by type") as bar:
            _, sets, extra = _product_lowest(prob.Q, factors, k + MARGIN, int(chunk_elems), bar)
        X = np.zeros((sets.shape[0], prob.N), dtype=np.int8)
        if sets.size:
            X[np.arange(sets.shape[0])[:, None], sets] = 1
        t_enum = time.perf_counter() - t0
        df = results_frame(prob.base, X, "exact", None, k, {**budget_info, **extra,
                                                             "method": "cartesian product of per-type combinations",
                                                             "chunk_elems": int(chunk_elems),
                                                             "enumeration_time_s": t_enum})
    full = np.zeros((len(df), prob.N), dtype=np.int8)
    for r, blocks in enumerate(df["removed_blocks"]):
        full[r, parse_blocks(blocks)] = 1
    df["feasible"] = prob.feasible(full) if len(df) else np.zeros(0, dtype=bool)
    dt = time.perf_counter() - t0
    df.attrs["solver_info"].update({"time_s": dt, "states_per_s": n_states / dt if dt > 0 else float("inf"),
                                    "block_types_of_problem": sorted(set(prob.block_types))})
    return df
