"""Solvers for :class:`~cbo_utils.ising.BlockRemovalProblem`: exact enumeration, simulated annealing, tabu search.

Every solver returns the same table, a :class:`pandas.DataFrame` with one row per state:

``rank``            0 = lowest energy found
``energy``          float64, recomputed exactly as ``xᵀQx + const`` on the full problem
``removed_blocks``  canonical string of the removed 0-based original block indices, e.g. ``"3 7 12"``
``solver``          ``"exact"``, ``"naive"``, ``"brute_force"``, ``"sa"`` or ``"tabu"``
``seed``            the sampler's seed (nullable ``Int64``; NA for deterministic enumeration)
``feasible``        whether the state satisfies every constraint of the problem
``tie``             energy equal (within ``1e-12·max(1,|E|)``) to that of a neighbour in the sorted list

Rows are sorted by energy, then by the ``removed_blocks`` string (so exactly equal energies are ordered
deterministically; ``energy`` is always non-decreasing). ``df.attrs["solver_info"]`` holds the solver's metadata
(times, counts, parameters).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .artifacts import atomic_write_text, format_blocks, parse_blocks, read_json, sidecar_path, write_sidecar
from .ising import BlockRemovalProblem

__all__ = [
    "COLUMNS", "SOLVERS", "exact_lowest", "naive_exact_lowest", "brute_force_lowest", "simulated_annealing", "tabu",
    "solve", "write_states_csv", "read_states_csv", "states_blocks", "states_to_matrix", "combinations_colex",
    "repair_states", "polish_states",
]

COLUMNS = ["rank", "energy", "removed_blocks", "solver", "seed", "feasible", "tie"]
TIE_RTOL = 1e-12

#: largest number of column subsets per matmul tile in :func:`exact_lowest`.
_COL_TILE = 1 << 16
#: candidates kept beyond ``k`` before the exact re-sort.
_MARGIN = 16
#: hard cap on the candidate buffer (only reached when huge numbers of states tie at the cut-off).
_CANDIDATE_CAP = 1 << 16


# ====================================================================================================================
# result table
# ====================================================================================================================

def _tie_groups(E: np.ndarray) -> np.ndarray:
    """Group ids of a sorted energy array: consecutive entries within ``TIE_RTOL·max(1,|E|)`` share a group."""
    if E.size == 0:
        return np.zeros(0, dtype=np.int64)
    gap = np.diff(E) > TIE_RTOL * np.maximum(1.0, np.maximum(np.abs(E[1:]), np.abs(E[:-1])))
    return np.concatenate([[0], np.cumsum(gap)])


def _results_frame(problem: BlockRemovalProblem, X: np.ndarray, solver: str, seed: int | None, k: int | None,
                   info: Mapping[str, Any]) -> pd.DataFrame:
    """The standard table from full 0/1 states ``X`` (duplicates dropped, exact energies, canonical order)."""
    X = np.asarray(X, dtype=np.int8).reshape(-1, problem.N)
    if X.shape[0]:
        X = np.unique(X, axis=0)
    E = np.asarray(problem.energy_of(X), dtype=np.float64).reshape(-1)
    feas = np.asarray(problem.feasible(X), dtype=bool).reshape(-1)
    names = np.array([format_blocks(np.flatnonzero(row)) for row in X], dtype=object)
    order = np.lexsort((names, E))  # by energy, then (exact ties) by the canonical string
    E, feas, names = E[order], feas[order], names[order]
    groups = _tie_groups(E)
    same = groups[1:] == groups[:-1]
    tie = np.zeros(E.size, dtype=bool)
    tie[1:] |= same
    tie[:-1] |= same
    if k is not None:
        E, feas, names, tie = E[:k], feas[:k], names[:k], tie[:k]
    df = pd.DataFrame({
        "rank": np.arange(E.size, dtype=np.int64),
        "energy": E.astype(np.float64),
        "removed_blocks": pd.Series(names, dtype=object).astype(str),
        "solver": solver,
        "seed": pd.array([seed] * E.size, dtype="Int64"),
        "feasible": feas,
        "tie": tie,
    }, columns=COLUMNS)
    full_info = {
        "solver": solver, "seed": seed, "N": problem.N, "M": problem.M, "energy": str(problem.energy),
        "keep": list(problem.keep), "remove": list(problem.remove),
        "only_types": None if problem.only_types is None else list(problem.only_types),
        "n_free": int(len(problem.free)), "M_free": problem.M_free, "k": k,
    }
    full_info.update(info)
    df.attrs["solver_info"] = full_info
    return df


def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (how many lowest states to return) must be a positive integer, got {k!r}")
    return int(k)


def _sets_to_full(problem: BlockRemovalProblem, sets_reduced: np.ndarray) -> np.ndarray:
    """Reduced index sets ``(n, m)`` (positions in ``problem.free``) → full int8 states."""
    free = problem.free
    X = np.zeros((sets_reduced.shape[0], len(free)), dtype=np.int8)
    if sets_reduced.size:
        X[np.arange(sets_reduced.shape[0])[:, None], sets_reduced] = 1
    return problem.expand(X)


# ====================================================================================================================
# combinations
# ====================================================================================================================

def _binom_table(n: int, r: int) -> np.ndarray:
    """``T[c, i] = C(c, i)`` for ``0 <= c <= n``, ``0 <= i <= r`` as int64 (checked against overflow)."""
    if math.comb(n, min(r, n // 2)) >= 2 ** 62:
        raise ValueError(f"C({n}, {r}) is too large to enumerate")
    return np.array([[math.comb(c, i) for i in range(r + 1)] for c in range(n + 1)], dtype=np.int64)


def _unrank_colex(ranks: np.ndarray, r: int, table: np.ndarray) -> np.ndarray:
    """The r-subsets with the given colexicographic ranks, as sorted rows ``c_1 < … < c_r`` (int64).

    Colex rank of ``{c_1 < … < c_r}`` is ``Σ_i C(c_i, i)``; unranking picks, from the largest position down, the
    largest ``c`` with ``C(c, i) <= rank`` (a vectorised ``searchsorted`` over the binomial table).
    """
    ranks = np.asarray(ranks, dtype=np.int64).copy()
    out = np.empty((ranks.size, r), dtype=np.int64)
    for i in range(r, 0, -1):
        col = table[:, i]
        c = np.searchsorted(col, ranks, side="right") - 1
        out[:, i - 1] = c
        ranks -= col[c]
    return out


def combinations_colex(n: int, r: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """r-subsets of ``range(n)`` with colex ranks ``start..stop-1`` as an int64 ``(count, r)`` array (rows sorted).

    In colex order the subsets of ``range(a)`` come first, so ranks ``0..C(a, r)-1`` are exactly the r-subsets of
    ``range(a)`` — which is what lets :func:`exact_lowest` enumerate prefixes group by group without materialising
    them all.
    """
    total = math.comb(n, r)
    stop = total if stop is None else min(stop, total)
    if r == 0:
        return np.zeros((max(0, stop - start), 0), dtype=np.int64)
    return _unrank_colex(np.arange(start, stop, dtype=np.int64), r, _binom_table(n, r))


# ====================================================================================================================
# exact enumeration
# ====================================================================================================================

def _resolve_device(device):
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _TopK:
    """Running set of the lowest approximate energies (plus everything within ``tol`` of the K-th)."""

    def __init__(self, K: int, tol: float):
        self.K, self.tol = K, tol
        self.vals: list[np.ndarray] = []
        self.sets: list[np.ndarray] = []
        self.count = 0
        self.thr = np.inf  # K-th lowest value so far (inf until K seen)
        self.truncated = False

    def add(self, vals: np.ndarray, sets: np.ndarray) -> None:
        if vals.size == 0:
            return
        self.vals.append(vals)
        self.sets.append(sets)
        self.count += vals.size
        if self.count >= 4 * self.K + 1024:
            self.prune()

    def prune(self) -> None:
        if not self.vals:
            return
        vals = np.concatenate(self.vals)
        sets = np.concatenate(self.sets)
        order = np.lexsort(tuple(sets.T[::-1]) + (vals,))
        vals, sets = vals[order], sets[order]
        if vals.size >= self.K:
            self.thr = float(vals[self.K - 1])
            keep = int(np.searchsorted(vals, self.thr + self.tol, side="right"))
            if keep > _CANDIDATE_CAP:
                keep = _CANDIDATE_CAP
                self.truncated = True
            vals, sets = vals[:keep], sets[:keep]
        self.vals, self.sets, self.count = [vals], [sets], vals.size

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.prune()
        if not self.vals:
            return np.zeros(0), np.zeros((0, 0), dtype=np.int64)
        return self.vals[0], self.sets[0]


def _set_sums(Mx: np.ndarray, T: np.ndarray) -> np.ndarray:
    """``Σ_{a,b} Mx[T_a, T_b]`` for each row ``T`` of indices into ``Mx`` (r² gathers; no N-wide temporaries)."""
    E = np.zeros(T.shape[0])
    for a in range(T.shape[1]):
        E += Mx[T[:, a], T[:, a]]
        for b in range(a + 1, T.shape[1]):
            E += 2.0 * Mx[T[:, a], T[:, b]]
    return E


class _Side:
    """The r-subsets of ``range(lo, hi)`` (colex order), generated on demand as matmul operands."""

    def __init__(self, Q: np.ndarray, lo: int, hi: int, r: int):
        self.Q, self.lo, self.hi, self.r = Q, lo, hi, r
        self.count = math.comb(hi - lo, r)
        self.table = _binom_table(hi - lo, r) if r > 0 else None

    def subsets(self, start: int, stop: int) -> np.ndarray:
        """Absolute indices ``(stop − start, r)`` of the subsets with colex ranks ``start..stop-1``."""
        if self.r == 0:
            return np.zeros((stop - start, 0), dtype=np.int64)
        return _unrank_colex(np.arange(start, stop, dtype=np.int64), self.r, self.table) + self.lo

    def energies(self, T: np.ndarray) -> np.ndarray:
        """``E_T = Σ_{i,j∈T} Q_ij`` for each row ``T``."""
        return _set_sums(self.Q, T)

    def row_operand(self, start: int, stop: int, other: _Side, T: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """``[2·F_T restricted to the other side's range, E_T, 1]`` and the subsets ``T`` (those of colex ranks
        ``start..stop-1``, or the given rows ``T``)."""
        T = self.subsets(start, stop) if T is None else T
        w = other.hi - other.lo
        A = np.zeros((T.shape[0], w + 2))
        F = A[:, :w]
        for a in range(T.shape[1]):
            F += self.Q[T[:, a], other.lo:other.hi]  # fields Σ_{i∈T} Q[i, other side]
        F *= 2.0
        A[:, w] = self.energies(T)
        A[:, w + 1] = 1.0
        return A, T

    def col_operand(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``[1_T over this side's range, 1, E_T]`` and the subsets ``T``."""
        T = self.subsets(start, stop)
        E = self.energies(T)
        w = self.hi - self.lo
        B = np.zeros((T.shape[0], w + 2))
        if T.shape[1]:
            B[np.arange(T.shape[0])[:, None], T - self.lo] = 1.0
        B[:, w] = 1.0
        B[:, w + 1] = E
        return B, T


class _Pruner:
    """Certified lower bounds on every completion of a partial state of the split enumeration.

    From the convexification of :func:`cbo_utils.bounds.convexify` (``P ⪰ 0``), made strictly positive definite by
    moving ``δ`` from the linear to the quadratic part (``P + δI``, ``c − δ``; an identity on binary states), every
    state ``x = (x_X, x_Y)`` over the two halves has ``E(x) = xᵀPx + cᵀx − μm²``. Minimising ``xᵀPx`` over a *real*
    ``x_Y`` leaves the Schur complement ``G_X = P_XX − P_XY P_YY⁻¹ P_YX ⪰ 0``, so for a subset ``T`` of one half and
    any ``S`` of the other ``E(T ∪ S) ≥ c_T + 1_TᵀG_X1_T + min_S c_S − μm²`` — a bound per row (and per column) of a
    matmul block, checked before the block is computed: rows and columns whose bound exceeds the current cut-off (the
    k-th best energy so far, or the warm start's) are dropped, and the exact k lowest are unchanged.
    """

    def __init__(self, Q: np.ndarray, m: int, split: int, time_limit: float | None):
        import scipy.linalg

        from .bounds import convexify

        n = Q.shape[0]
        t0 = time.perf_counter()
        conv = convexify(Q, m, time_limit=time_limit)
        P = Q - np.diag(conv.d) + conv.mu + (conv.v[:, None] + conv.v[None, :]) / 2.0
        self.delta = 1e-3 * float(np.abs(np.diag(P)).max() + 1e-300) + max(0.0, -conv.lam_min)
        P = P + self.delta * np.eye(n)
        self.c = conv.d - self.delta - m * conv.v
        self.const = -conv.mu * m * m
        self.G: dict[int, np.ndarray] = {}
        self.h: dict[int, np.ndarray] = {}
        self.s: dict[int, float] = {}
        for lo, hi in ((0, split), (split, n)):
            X = np.arange(lo, hi)
            Y = np.setdiff1d(np.arange(n), X)
            if Y.size:
                cf = scipy.linalg.cho_factor(P[np.ix_(Y, Y)])
                G = P[np.ix_(X, X)] - P[np.ix_(X, Y)] @ scipy.linalg.cho_solve(cf, P[np.ix_(Y, X)])
                w = scipy.linalg.cho_solve(cf, np.ones(Y.size))  # P_YY⁻¹1
                self.h[lo] = P[np.ix_(X, Y)] @ w
                self.s[lo] = float(w.sum())
            else:
                G = P[np.ix_(X, X)]
                self.h[lo], self.s[lo] = np.zeros(X.size), math.inf
            self.G[lo] = (G + G.T) / 2.0
        size = float(np.abs(self.c).max()) * m + max(float(np.abs(g).max()) for g in self.G.values()) * m * m
        self.margin = 1e-9 * (size + abs(self.const)) + 1e-300  # rounding of G and of the sums, generously
        self.root_bound = conv.bound
        self.time_s = time.perf_counter() - t0

    def partial(self, side: _Side, T: np.ndarray, q: int) -> np.ndarray:
        """``c_T + min {xᵀPx : x_X = 1_T, x_Y real, 1ᵀx_Y = q} = c_T + 1_TᵀG1_T + (q + h_T)²/s`` for the rows ``T``
        (absolute indices) of one half, ``h = P_XY P_YY⁻¹1``, ``s = 1ᵀP_YY⁻¹1``."""
        Tl = T - side.lo
        out = self.c[T].sum(axis=1) + _set_sums(self.G[side.lo], Tl)
        if np.isfinite(self.s[side.lo]):
            hT = self.h[side.lo][Tl].sum(axis=1) if T.shape[1] else np.zeros(T.shape[0])
            out += (q + hT) ** 2 / self.s[side.lo]
        return out

    def cheapest(self, side: _Side) -> float:
        """The smallest ``c_S`` over the ``side.r``-subsets of one half."""
        return float(np.sort(self.c[side.lo:side.hi])[: side.r].sum())


def _warm_cutoff(Q: np.ndarray, m: int, K: int, seed: int = 0, starts: int = 64) -> float:
    """An upper bound on the K-th lowest energy: the K-th lowest of distinct states found by steepest-descent swaps
    from ``starts`` random starts (and the m cheapest diagonal entries) and the one-swap neighbours of the 16 best
    local minima (``inf`` if fewer than K distinct states). Any K distinct feasible states bound it from above."""
    n = Q.shape[0]
    if math.comb(n, m) <= K:
        return math.inf
    rng = np.random.default_rng(seed)
    X = np.zeros((starts, n))
    X[0, np.argsort(np.diag(Q), kind="stable")[:m]] = 1.0
    for s in range(1, starts):
        X[s, rng.choice(n, m, replace=False)] = 1.0
    Xp, _, _ = polish_states(Q, X)
    U = np.unique(Xp, axis=0).astype(np.float64)
    E = np.einsum("bi,ij,bj->b", U, Q, U)
    pool = [U]
    for x in U[np.argsort(E, kind="stable")[:16]]:
        ones, zeros = np.flatnonzero(x), np.flatnonzero(x == 0)
        nb = np.repeat(x[None, :], ones.size * zeros.size, axis=0)
        ii, jj = np.repeat(ones, zeros.size), np.tile(zeros, ones.size)
        nb[np.arange(nb.shape[0]), ii] = 0.0
        nb[np.arange(nb.shape[0]), jj] = 1.0
        pool.append(nb)
    S = np.unique(np.concatenate(pool).astype(np.int8), axis=0).astype(np.float64)
    if S.shape[0] < K:
        return math.inf
    E = np.einsum("bi,ij,bj->b", S, Q, S)
    return float(np.partition(E, K - 1)[K - 1])


def _enumerate_lowest(Q: np.ndarray, m: int, K: int, chunk_elems: int, device, bar, checkpoint: Path | None = None,
                      checkpoint_every_s: float = 60.0, prune: bool = True, bound_time_limit: float | None = 10.0
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Approximate energies and index sets (rows of ``m`` indices into ``range(n)``) of the ~K lowest m-subsets of
    ``xᵀQx``, with every state within a small tolerance of the K-th included. See :func:`exact_lowest`.

    ``checkpoint``: the running candidates and the number of finished chunks (matmul blocks, in their fixed order)
    are saved there every ``checkpoint_every_s`` seconds; a rerun with the same ``Q``, ``m``, ``K`` and
    ``chunk_elems`` skips the finished chunks. ``prune``: skip rows and columns of a block whose certified lower
    bound (:class:`_Pruner`) exceeds the cut-off, which starts at a warm start's K-th energy (:func:`_warm_cutoff`)."""
    import torch

    n = Q.shape[0]
    complement = m > n - m
    if complement:  # x = 1 − y: xᵀQx = yᵀ(Q − 2 diag(Q·1))y + 1ᵀQ1, with n − m ones in y
        Qw = Q - 2.0 * np.diag(Q.sum(axis=1))
        mw = n - m
    else:
        Qw, mw = Q, m
    c = n // 2  # split point: left blocks [0, c), right blocks [c, n)
    scale = float(np.abs(Qw).max()) * max(1, mw) ** 2 + 1e-300
    tol = 1e-10 * scale
    top = _TopK(K, tol)
    col_tile_max = max(1, min(chunk_elems, _COL_TILE))
    n_blocks = n_pairs = 0
    key = _enum_key(Q, m, K, chunk_elems)
    skip, seen = _load_enum_checkpoint(checkpoint, key, top, mw) if checkpoint is not None else (0, 0)
    if bar is not None and seen:
        bar.update(seen)
    resumed_chunks, last_save, chunk_id = skip, time.perf_counter(), 0
    pruner, warm, pruned = None, math.inf, 0
    if prune and 0 < mw < n:
        pruner = _Pruner(Qw, mw, c, bound_time_limit)
        t_w = time.perf_counter()
        warm = _warm_cutoff(Qw, mw, K)
        warm_time = time.perf_counter() - t_w

    def cutoff() -> float:
        return min(top.thr, warm) + tol
    for p in range(max(0, mw - (n - c)), min(c, mw) + 1):
        left, right = _Side(Qw, 0, c, p), _Side(Qw, c, n, mw - p)
        # the larger side is streamed as rows, the smaller one is the (tiled) column operand
        rows, cols = (left, right) if left.count >= right.count else (right, left)
        n_pairs += 1
        if cols.r == 0 and rows.r > 1 and rows.count > chunk_elems and rows.hi - rows.lo >= 4:
            # all m blocks in one half (a one-column product): enumerate that half on its own, split again, as
            # one chunk — streaming its rows against a single column would cost ~1 µs per state
            chunk_id += 1
            if chunk_id > skip:
                sub = Qw[rows.lo:rows.hi, rows.lo:rows.hi]
                _, s_sub, _ = _enumerate_lowest(sub, rows.r, K, chunk_elems, device, None, prune=prune,
                                                bound_time_limit=bound_time_limit)
                if s_sub.size:  # energies recomputed here (the sub-enumeration may have worked on a complement)
                    top.add(_set_sums(sub, s_sub), s_sub + rows.lo)
                    top.prune()
                seen += rows.count
                if bar is not None:
                    bar.update(rows.count)
            continue
        col_tile = min(cols.count, col_tile_max)
        width = cols.hi - cols.lo + 2
        for c0 in range(0, cols.count, col_tile):
            c1 = min(cols.count, c0 + col_tile)
            row_step = max(1, min(chunk_elems // (c1 - c0), chunk_elems // max(n, width)))
            n_row_chunks = -(-rows.count // row_step)
            if chunk_id + n_row_chunks <= skip:  # finished before the interruption
                chunk_id += n_row_chunks
                continue
            B_np, T_cols = cols.col_operand(c0, c1)
            col_min = -math.inf
            if pruner is not None:
                cut0 = cutoff()
                row_cheapest = pruner.cheapest(rows)
                cpart = pruner.partial(cols, T_cols, rows.r)
                ok = cpart + row_cheapest + pruner.const <= cut0 + pruner.margin
                if not ok.all():
                    B_np, T_cols = B_np[ok], T_cols[ok]
                lin = pruner.c[T_cols].sum(axis=1)
                col_min = float(lin.min()) if lin.size else math.inf
            if T_cols.shape[0] == 0:  # every column of the tile pruned
                todo = n_row_chunks - max(0, skip - chunk_id)  # (a resumed run counted the finished chunks)
                numel_tile = (c1 - c0) * min(rows.count, todo * row_step)
                chunk_id += n_row_chunks
                seen += numel_tile
                pruned += numel_tile
                if bar is not None:
                    bar.update(numel_tile)
                continue
            B = torch.from_numpy(B_np).to(device)
            for r0 in range(0, rows.count, row_step):
                r1 = min(rows.count, r0 + row_step)
                chunk_id += 1
                if chunk_id <= skip:
                    continue
                if checkpoint is not None and time.perf_counter() - last_save >= checkpoint_every_s:
                    _save_enum_checkpoint(checkpoint, key, top, chunk_id - 1, seen, mw)
                    last_save = time.perf_counter()
                full = (r1 - r0) * (c1 - c0)
                # a row bound costs ~r² gathers; it pays only when it can save a block of at least a few columns
                if pruner is not None and T_cols.shape[0] * width >= 8 * max(1, rows.r) ** 2:
                    T_rows = rows.subsets(r0, r1)
                    lb = pruner.partial(rows, T_rows, cols.r) + col_min
                    ok = lb + pruner.const <= cutoff() + pruner.margin
                    if not ok.any():
                        seen += full
                        pruned += full
                        if bar is not None:
                            bar.update(full)
                        continue
                    A_np, T_rows = rows.row_operand(0, 0, cols, T=T_rows[ok])
                else:
                    A_np, T_rows = rows.row_operand(r0, r1, cols)
                blk = torch.from_numpy(A_np).to(device) @ B.T  # E_rows + E_cols + 2·F_rows·1_cols
                n_blocks += 1
                numel = blk.numel()
                pruned += full - numel
                if top.count < K:
                    kk = min(K, numel)
                    cut = np.inf if kk == numel else float(torch.kthvalue(blk.reshape(-1), kk).values) + tol
                    cut = min(cut, warm + tol)
                else:
                    cut = cutoff()
                if np.isinf(cut):
                    hit = torch.ones_like(blk, dtype=torch.bool).nonzero()
                else:
                    # one reduction pass over the block; the (rare) rows holding a hit are then searched exactly
                    row_ids = (blk.amin(dim=1) <= cut).nonzero().reshape(-1)
                    if row_ids.numel() == 0:
                        seen += full
                        if bar is not None:
                            bar.update(full)
                        continue
                    hit = (blk.index_select(0, row_ids) <= cut).nonzero()
                    hit[:, 0] = row_ids[hit[:, 0]]
                vals_t = blk[hit[:, 0], hit[:, 1]]
                if vals_t.numel() > _CANDIDATE_CAP:  # only on huge plateaus of equal energies
                    sel = torch.topk(vals_t, _CANDIDATE_CAP, largest=False).indices
                    vals_t, hit = vals_t[sel], hit[sel]
                    top.truncated = True
                vals = vals_t.cpu().numpy()
                hit = hit.cpu().numpy()
                top.add(vals, np.concatenate([T_rows[hit[:, 0]], T_cols[hit[:, 1]]], axis=1))
                if top.count >= K and not np.isfinite(top.thr):
                    top.prune()
                seen += full
                if bar is not None:
                    bar.update(full)
    vals, sets = top.result()
    sets = np.sort(sets, axis=1) if sets.size else sets.reshape(-1, mw)
    if complement:
        full = np.ones((sets.shape[0], n), dtype=bool)
        full[np.arange(sets.shape[0])[:, None], sets] = False
        sets = np.nonzero(full)[1].reshape(sets.shape[0], m)
    info = {"split": c, "complement": complement, "n_size_pairs": n_pairs, "n_blocks": n_blocks,
            "candidates": int(vals.size), "candidates_truncated": top.truncated, "resumed_chunks": resumed_chunks,
            "pruned_states": pruned, "pruned_fraction": pruned / max(1, math.comb(n, m))}
    if pruner is not None:  # in the units of Q (the complement's constant 1ᵀQ1 added back)
        back = float(Q.sum()) if complement else 0.0
        info.update(root_bound=pruner.root_bound + back, bound_time_s=pruner.time_s, warm_cutoff=warm + back,
                    warm_start_time_s=warm_time)
    if checkpoint is not None and checkpoint.is_file():
        checkpoint.unlink()
    return vals, sets, info


_ENUM_FORMAT = "cbo-enumeration-checkpoint-1"


def _enum_key(Q: np.ndarray, m: int, K: int, chunk_elems: int) -> str:
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(Q, dtype=np.float64).tobytes())
    h.update(f"{m}:{K}:{chunk_elems}:{_COL_TILE}".encode())
    return h.hexdigest()[:32]


def _save_enum_checkpoint(path: Path, key: str, top: _TopK, chunks_done: int, seen: int, mw: int) -> None:
    """The candidates so far and the number of finished chunks, atomically (safetensors + JSON header)."""
    from safetensors.numpy import save

    from .artifacts import atomic_write_bytes

    top.prune()
    vals = top.vals[0] if top.vals else np.zeros(0)
    sets = top.sets[0] if top.sets else np.zeros((0, mw), dtype=np.int64)
    atomic_write_bytes(path, save({"vals": np.ascontiguousarray(vals, dtype=np.float64),
                                   "sets": np.ascontiguousarray(sets, dtype=np.int64).reshape(-1, mw)},
                                  metadata={"format": _ENUM_FORMAT, "key": key, "chunks_done": str(chunks_done),
                                            "seen": str(seen), "truncated": str(bool(top.truncated))}))


def _load_enum_checkpoint(path: Path, key: str, top: _TopK, mw: int) -> tuple[int, int]:
    """Restore the candidates of an interrupted enumeration; returns (finished chunks, states seen)."""
    from safetensors import safe_open

    if not path.is_file():
        return 0, 0
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != _ENUM_FORMAT or meta.get("key") != key:
            raise ValueError(f"the checkpoint {path} belongs to another problem, k or chunk size; delete it or pass "
                             "another checkpoint path")
        vals, sets = fh.get_tensor("vals"), fh.get_tensor("sets").reshape(-1, mw)
    if vals.size:
        top.add(vals, sets)
        top.prune()
    top.truncated = meta.get("truncated") == "True"
    return int(meta["chunks_done"]), int(meta["seen"])


def exact_lowest(problem: BlockRemovalProblem, k: int = 20, chunk_elems: int = 2 ** 22, device=None,
                 progress: bool = True, checkpoint: str | Path | None = None,
                 checkpoint_every_s: float = 60.0, prune: bool = True,
                 bound_time_limit: float | None = 10.0) -> pd.DataFrame:
    """The ``k`` lowest-energy feasible states, by enumerating all ``C(n_free, M_free)`` states of the reduced
    problem.

    Algorithm (float64 torch, so it also runs on CUDA with ``device="cuda"``; ``None``/``"auto"`` picks CUDA when
    available). When ``M_free > n_free/2`` the complement is enumerated instead
    (``x = 1 − y``: ``xᵀQx = yᵀ(Q − 2·diag(Q1))y + 1ᵀQ1``). The blocks are split at ``c = n/2`` into a left half
    ``L = [0, c)`` and a right half ``R = [c, n)``; every m-subset is ``T = P ∪ S`` with ``P ⊂ L``, ``S ⊂ R`` of sizes
    ``p + q = m``, and ``E(T) = E_P + E_S + 2·F_P·1_S`` with ``F_P = Σ_{i∈P} Q[i, R]``. For each size pair the
    smaller side is built (colex unranking, a few numpy gathers) as rows ``[1_S, 1, E_S]`` and the larger side is
    streamed as rows ``[2F_P, E_P, 1]``, so a whole block of energies is one BLAS matmul with an inner dimension of
    only ``n/2 + 2``. Blocks hold at most ``chunk_elems`` energies (operands are ``O(chunk_elems·n)``). The running
    best are kept with ``kthvalue`` until ``k + 16`` candidates exist, afterwards by one row-minimum pass per block
    against the current cut-off (rows with a hit are then searched exactly). The candidates (and any state within a
    tiny tolerance of the last) are re-evaluated exactly as ``xᵀQx + const`` on the full problem and re-sorted, so
    the order is exact up to float64 rounding; ``tie`` may also refer to a candidate just beyond ``k``.

    Long runs: the progress bar shows the rate and the time left; with ``checkpoint`` (a file path) the candidates
    and the number of finished chunks are saved there every ``checkpoint_every_s`` seconds (atomically), a rerun
    with the same arguments after an interruption resumes from the last saved chunk, and the file is removed when
    the enumeration completes.

    Pruning (``prune=True``, the default): before each matmul block, the rows and columns whose certified lower
    bound on every completion (:class:`_Pruner`: the convexification of :mod:`cbo_utils.bounds` with a Schur
    complement per half) is above the cut-off are dropped; the cut-off is the k-th best energy so far, or from the
    start the k-th energy of a cheap warm start (:func:`_warm_cutoff`), so only states that cannot be among the k
    lowest are skipped and the answer is the same as without pruning (tested against full enumeration).
    ``solver_info`` then reports ``pruned_fraction``, ``root_bound`` (a certified lower bound on the optimum) and the
    warm start's cut-off.

    Returns the standard table (see module docstring); ``attrs["solver_info"]`` has ``n_states``, ``time_s``,
    ``states_per_s``, the split point, the device and the torch thread count.
    """
    import torch
    from tqdm.auto import tqdm

    k = _check_k(k)
    chunk_elems = int(chunk_elems)
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")
    dev = _resolve_device(device)
    Qr, _, _, m = problem.reduced()
    n = Qr.shape[0]
    n_states = math.comb(n, m)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"n_states": n_states, "chunk_elems": chunk_elems, "device": str(dev),
                            "torch_threads": torch.get_num_threads()}
    if m == 0 or m == n:
        sets = np.arange(n, dtype=np.int64)[None, :m]
    else:
        K = k + _MARGIN
        with tqdm(total=n_states, unit="state", unit_scale=True, disable=not progress, desc="exact") as bar:
            _, sets, extra = _enumerate_lowest(Qr, m, K, chunk_elems, dev, bar,
                                               None if checkpoint is None else Path(checkpoint), checkpoint_every_s,
                                               prune=prune, bound_time_limit=bound_time_limit)
        for key_ in ("root_bound", "warm_cutoff"):  # reduced units → full-problem units
            if key_ in extra:
                extra[key_] += problem.reduced()[1]
        info.update(extra)
    t_enum = time.perf_counter() - t0
    X = _sets_to_full(problem, sets)
    df = _results_frame(problem, X, "exact", None, k, info)
    dt = time.perf_counter() - t0
    df.attrs["solver_info"].update({"time_s": dt, "enumeration_time_s": t_enum,
                                    "states_per_s": n_states / dt if dt > 0 else float("inf")})
    return df


def naive_exact_lowest(problem: BlockRemovalProblem, k: int = 20, batch: int = 1 << 16,
                       max_states: int | None = None) -> pd.DataFrame:
    """Reference enumeration: ``itertools.combinations`` over the free blocks, energies by batched ``np.einsum``.

    ``max_states`` stops after that many combinations (for timing); ``attrs["solver_info"]["complete"]`` says
    whether every state was seen.
    """
    k = _check_k(k)
    Qr, _, _, m = problem.reduced()
    n = Qr.shape[0]
    total = math.comb(n, m)
    limit = total if max_states is None else min(total, int(max_states))
    t0 = time.perf_counter()
    best_v = np.zeros(0)
    best_s = np.zeros((0, m), dtype=np.int64)
    it = itertools.combinations(range(n), m)
    seen = 0
    K = k + _MARGIN
    while seen < limit:
        take = min(batch, limit - seen)
        idx = np.fromiter(itertools.chain.from_iterable(itertools.islice(it, take)), dtype=np.int64,
                          count=take * m).reshape(take, m)
        X = np.zeros((take, n))
        X[np.arange(take)[:, None], idx] = 1.0
        E = np.einsum("bi,ij,bj->b", X, Qr, X, optimize=True)
        v = np.concatenate([best_v, E])
        s = np.concatenate([best_s, idx])
        if v.size > K:
            sel = np.argpartition(v, K - 1)[:K]
            v, s = v[sel], s[sel]
        best_v, best_s = v, s
        seen += take
    dt = time.perf_counter() - t0
    X = _sets_to_full(problem, best_s)
    info = {"n_states": seen, "n_states_total": total, "complete": seen == total, "time_s": dt,
            "states_per_s": seen / dt if dt > 0 else float("inf")}
    return _results_frame(problem, X, "naive", None, k, info)


def brute_force_lowest(problem: BlockRemovalProblem, k: int = 20, max_N: int = 22) -> pd.DataFrame:
    """Independent check for tests: all ``2^N`` full states, filtered with :meth:`BlockRemovalProblem.feasible`."""
    k = _check_k(k)
    N = problem.N
    if N > max_N:
        raise ValueError(f"brute force over 2^{N} states is too slow; use exact_lowest (or raise max_N)")
    t0 = time.perf_counter()
    codes = np.arange(2 ** N, dtype=np.int64)
    X = ((codes[:, None] >> np.arange(N)) & 1).astype(np.int8)
    X = X[problem.feasible(X)]
    E = problem.energy_of(X)
    sel = np.argsort(E, kind="stable")[: k + _MARGIN]
    info = {"n_states": 2 ** N, "n_feasible": int(X.shape[0]), "time_s": time.perf_counter() - t0}
    return _results_frame(problem, X[sel], "brute_force", None, k, info)


# ====================================================================================================================
# heuristic samplers: repair + polish
# ====================================================================================================================

def repair_states(Q: np.ndarray, m: int, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedily make every row of the reduced 0/1 states ``X`` have exactly ``m`` ones.

    While ``Σx > m`` drop the one whose removal lowers ``xᵀQx`` most; while ``Σx < m`` add the zero that raises it
    least. Returns ``(X_repaired as int8, was_infeasible bool mask)``. Only free variables exist in the reduced
    problem, so keep/type restrictions hold automatically.
    """
    X = np.asarray(X, dtype=np.float64).copy()
    s = X.sum(axis=1).round().astype(np.int64)
    bad = s != m
    if not bad.any():
        return X.astype(np.int8), bad
    d = np.diag(Q)
    rows = np.flatnonzero(bad)
    Xb = X[rows]
    f = Xb @ Q  # f_i = Σ_j Q_ij x_j
    sb = s[rows]
    while True:
        over = sb > m
        if not over.any():
            break
        r = np.flatnonzero(over)
        gain = np.where(Xb[r] == 1, d - 2.0 * f[r], np.inf)  # energy change of flipping a one to zero
        i = np.argmin(gain, axis=1)
        Xb[r, i] = 0.0
        f[r] -= Q[i]
        sb[r] -= 1
    while True:
        under = sb < m
        if not under.any():
            break
        r = np.flatnonzero(under)
        cost = np.where(Xb[r] == 0, d + 2.0 * f[r], np.inf)  # energy change of flipping a zero to one
        j = np.argmin(cost, axis=1)
        Xb[r, j] = 1.0
        f[r] += Q[j]
        sb[r] += 1
    X[rows] = Xb
    return X.astype(np.int8), bad


def polish_states(Q: np.ndarray, X: np.ndarray, max_iter: int = 10_000, chunk_rows: int = 256
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Steepest-descent swap moves (one one ↔ one zero) on feasible reduced states until no swap lowers ``xᵀQx``.

    The energy change of swapping ``i`` (1→0) with ``j`` (0→1) is ``(Q_ii − 2f_i) + (Q_jj + 2f_j) − 2Q_ij`` with
    ``f = Qx``. Returns ``(X as int8, improved bool mask, total number of swaps)``.
    """
    X = np.asarray(X, dtype=np.float64).copy()
    n = Q.shape[0]
    improved = np.zeros(X.shape[0], dtype=bool)
    moves = 0
    if n < 2 or X.shape[0] == 0:
        return X.astype(np.int8), improved, moves
    d = np.diag(Q)
    tol = 1e-12 * max(1.0, float(np.abs(Q).max()) * n)
    for lo in range(0, X.shape[0], chunk_rows):
        Xc = X[lo:lo + chunk_rows]
        f = Xc @ Q
        active = np.arange(Xc.shape[0])
        for _ in range(max_iter):
            if active.size == 0:
                break
            xa, fa = Xc[active], f[active]
            dr = np.where(xa == 1, d - 2.0 * fa, np.inf)
            da = np.where(xa == 0, d + 2.0 * fa, np.inf)
            D = dr[:, :, None] + da[:, None, :] - 2.0 * Q[None, :, :]
            flat = D.reshape(D.shape[0], -1)
            best = np.argmin(flat, axis=1)
            gain = flat[np.arange(flat.shape[0]), best]
            go = gain < -tol
            if not go.any():
                break
            rows = active[go]
            i, j = np.divmod(best[go], n)
            Xc[rows, i] = 0.0
            Xc[rows, j] = 1.0
            f[rows] += Q[j] - Q[i]
            improved[lo + rows] = True
            moves += int(rows.size)
            active = rows
        X[lo:lo + chunk_rows] = Xc
    return X.astype(np.int8), improved, moves


def _sampler_frame(problem: BlockRemovalProblem, sampleset, solver: str, seed, k: int, polish: bool,
                   info: dict) -> pd.DataFrame:
    """Repair, polish, de-duplicate and tabulate the samples of a dimod sample set over the free blocks."""
    Qr, _, free, m = problem.reduced()
    t0 = time.perf_counter()
    pos = {v: i for i, v in enumerate(sampleset.variables)}
    cols = np.array([pos[int(v)] for v in free], dtype=np.int64)
    raw = np.asarray(sampleset.record.sample)[:, cols]
    occ = np.asarray(sampleset.record.num_occurrences, dtype=np.int64)
    Xr, bad = repair_states(Qr, m, raw)
    n_distinct_raw = int(np.unique(raw, axis=0).shape[0])
    improved = np.zeros(Xr.shape[0], dtype=bool)
    moves = 0
    pool = Xr
    if polish:
        Xu, inv = np.unique(Xr, axis=0, return_inverse=True)
        Xp, imp_u, moves = polish_states(Qr, Xu)
        improved = imp_u[inv.reshape(-1)]
        pool = np.concatenate([Xu, Xp])  # the k best come from every state seen, polished or not
    X = problem.expand(np.unique(pool, axis=0))
    n_distinct = int(X.shape[0])
    info = dict(info)
    info.update({
        "n_samples": int(occ.sum()), "n_records": int(raw.shape[0]), "n_infeasible": int(occ[bad].sum()),
        "n_repaired": int(occ[bad].sum()), "n_distinct_raw": n_distinct_raw, "n_distinct": n_distinct,
        "polish": bool(polish), "n_polish_improved": int(occ[improved].sum()), "n_polish_swaps": moves,
        "postprocess_time_s": time.perf_counter() - t0,
    })
    return _results_frame(problem, X, solver, seed, k, info)


def _trivial_frame(problem: BlockRemovalProblem, solver: str, seed, k: int, info: dict) -> pd.DataFrame | None:
    """The single feasible state when nothing is left to choose (``M_free`` is 0 or every free block)."""
    n, m = len(problem.free), problem.M_free
    if m not in (0, n):
        return None
    X = problem.expand(np.full((1, n), 1 if m else 0, dtype=np.int8))
    info = dict(info, n_samples=0, n_infeasible=0, n_repaired=0, n_distinct=1, trivial=True)
    return _results_frame(problem, X, solver, seed, k, info)


def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an integer in [0, 2^32), got {seed!r}")
    return int(seed)


def simulated_annealing(problem: BlockRemovalProblem, k: int = 20, num_reads: int = 1000, num_sweeps: int = 1000,
                        seed: int = 0, polish: bool = True, lam: float | None = None, **kw) -> pd.DataFrame:
    """Simulated annealing (``neal.SimulatedAnnealingSampler``) on the penalty QUBO of the reduced problem.

    Infeasible samples are repaired greedily (:func:`repair_states`) and, with ``polish=True``, every distinct state is
    improved by steepest-descent swaps (:func:`polish_states`); the ``k`` best distinct states among the repaired and
    the polished ones are returned (fewer when fewer distinct states were seen).

    ``attrs["solver_info"]`` counts ``n_samples``, ``n_infeasible`` (samples with ``Σx ≠ M``), ``n_repaired``,
    ``n_distinct_raw`` (distinct raw samples), ``n_distinct`` (distinct states in the final pool),
    ``n_polish_improved`` (samples whose state a swap improved) and ``n_polish_swaps``, plus ``penalty_lambda`` and
    timings. Extra
    keyword arguments go to the sampler (e.g. ``beta_range``). A fixed ``seed`` gives identical results.
    """
    import neal

    k, seed = _check_k(k), _check_seed(seed)
    info = {"num_reads": int(num_reads), "num_sweeps": int(num_sweeps), "sampler_kwargs": dict(kw)}
    trivial = _trivial_frame(problem, "sa", seed, k, info)
    if trivial is not None:
        return trivial
    bqm = problem.to_bqm(penalty=True, lam=lam)
    lam_used = problem.penalty_lambda() if lam is None else float(lam)
    t0 = time.perf_counter()
    ss = neal.SimulatedAnnealingSampler().sample(bqm, num_reads=int(num_reads), num_sweeps=int(num_sweeps),
                                                 seed=seed, **kw)
    info.update({"penalty_lambda": lam_used, "sample_time_s": time.perf_counter() - t0})
    df = _sampler_frame(problem, ss, "sa", seed, k, polish, info)
    df.attrs["solver_info"]["time_s"] = time.perf_counter() - t0
    return df


def tabu(problem: BlockRemovalProblem, k: int = 20, num_reads: int = 20, timeout_ms: int | None = 200, seed: int = 0,
         polish: bool = True, lam: float | None = None, num_restarts: int | None = None, **kw) -> pd.DataFrame:
    """Multistart tabu search (``dwave.samplers.TabuSampler``) on the penalty QUBO, with the same repair/polish as
    :func:`simulated_annealing`.

    Reproducibility: with a ``timeout_ms`` the search length depends on the machine's speed, so a fixed seed gives
    the same result only up to timing. Pass ``timeout_ms=None`` (and e.g. ``num_restarts=10``; default then 10) for
    bit-reproducible runs bounded by work instead of time. Extra keyword arguments go to the sampler
    (``tenure``, ``lower_bound_z``, ``coefficient_z_first``, …).
    """
    from dwave.samplers import TabuSampler

    k, seed = _check_k(k), _check_seed(seed)
    if timeout_ms is None and num_restarts is None:
        num_restarts = 10
    info = {"num_reads": int(num_reads), "timeout_ms": timeout_ms, "num_restarts": num_restarts,
            "sampler_kwargs": dict(kw)}
    trivial = _trivial_frame(problem, "tabu", seed, k, info)
    if trivial is not None:
        return trivial
    bqm = problem.to_bqm(penalty=True, lam=lam)
    lam_used = problem.penalty_lambda() if lam is None else float(lam)
    args = dict(kw)
    args["timeout"] = None if timeout_ms is None else int(timeout_ms)
    if num_restarts is not None:
        args["num_restarts"] = int(num_restarts)
    t0 = time.perf_counter()
    ss = TabuSampler().sample(bqm, num_reads=int(num_reads), seed=seed, **args)
    info.update({"penalty_lambda": lam_used, "sample_time_s": time.perf_counter() - t0})
    df = _sampler_frame(problem, ss, "tabu", seed, k, polish, info)
    df.attrs["solver_info"]["time_s"] = time.perf_counter() - t0
    return df


# ====================================================================================================================
# dispatcher and I/O
# ====================================================================================================================

SOLVERS = {
    "exact": "exact_lowest", "naive": "naive_exact_lowest", "brute_force": "brute_force_lowest",
    "sa": "simulated_annealing", "tabu": "tabu",
}
_ALIASES = {"simulated_annealing": "sa", "neal": "sa", "enumeration": "exact", "bruteforce": "brute_force"}


def solve(problem: BlockRemovalProblem, solver: str = "exact", k: int = 20, seed: int = 0, **kw) -> pd.DataFrame:
    """Run ``solver`` (``"exact"``, ``"sa"``, ``"tabu"``, or the references ``"naive"``, ``"brute_force"``) and
    return the standard table. ``seed`` is used by the samplers only; extra keywords go to the solver."""
    name = _ALIASES.get(str(solver).lower(), str(solver).lower())
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known solvers: {', '.join(SOLVERS)} "
                         f"(aliases: {', '.join(_ALIASES)})")
    if name == "exact":
        return exact_lowest(problem, k=k, **kw)
    if name == "naive":
        return naive_exact_lowest(problem, k=k, **kw)
    if name == "brute_force":
        return brute_force_lowest(problem, k=k, **kw)
    if name == "sa":
        return simulated_annealing(problem, k=k, seed=seed, **kw)
    return tabu(problem, k=k, seed=seed, **kw)


def write_states_csv(df: pd.DataFrame, path, provenance_record: Mapping[str, Any] | None = None) -> Path:
    """Atomically write the table as CSV; with a provenance record also write the sidecar ``<path>.json``, adding
    ``df.attrs["solver_info"]`` to it under ``"solver_info"``."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"not a solver table: columns {missing} are missing (expected {COLUMNS})")
    extra = [c for c in df.columns if c not in COLUMNS]
    path = Path(path)
    atomic_write_text(path, df[COLUMNS + extra].to_csv(index=False, float_format="%.17g", lineterminator="\n"))
    if provenance_record is not None:
        record = dict(provenance_record)
        record.setdefault("solver_info", df.attrs.get("solver_info", {}))
        write_sidecar(path, record)
    return path


def read_states_csv(path) -> pd.DataFrame:
    """Read a table written by :func:`write_states_csv` (``removed_blocks`` stays a string). If the sidecar exists
    its ``solver_info`` is put back into ``df.attrs``."""
    path = Path(path)
    df = pd.read_csv(path, dtype={"removed_blocks": str, "solver": str}, keep_default_na=False,
                     na_values={"seed": [""]})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a solver table: columns {missing} are missing")
    df["rank"] = df["rank"].astype(np.int64)
    df["energy"] = df["energy"].astype(np.float64)
    df["seed"] = pd.array(df["seed"], dtype="Int64")
    for col in ("feasible", "tie"):
        if df[col].dtype != bool:
            df[col] = df[col].astype(str).str.lower().map({"true": True, "false": False}).astype(bool)
    side = sidecar_path(path)
    if side.is_file():
        rec = read_json(side)
        if isinstance(rec, dict) and "solver_info" in rec:
            df.attrs["solver_info"] = rec["solver_info"]
    return df


def states_blocks(df: pd.DataFrame) -> list[list[int]]:
    """The removed blocks of each row as lists of 0-based indices."""
    return [parse_blocks(s) for s in df["removed_blocks"]]


def states_to_matrix(df: pd.DataFrame, N: int) -> np.ndarray:
    """The rows of a solver table as an ``(n, N)`` int8 0/1 matrix."""
    out = np.zeros((len(df), int(N)), dtype=np.int8)
    for r, blocks in enumerate(states_blocks(df)):
        if blocks and (min(blocks) < 0 or max(blocks) >= N):
            raise ValueError(f"row {r} removes blocks outside 0..{N - 1}: {blocks}")
        out[r, blocks] = 1
    return out
