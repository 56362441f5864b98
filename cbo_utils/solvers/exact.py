"""Exact k-lowest enumeration of a :class:`~cbo_utils.problem.ising.BlockRemovalProblem`: all C(N, M) states in
colex order, split into two halves and tiled as matrix products (CPU or CUDA, bounded memory), pruned by certified
row/column bounds against a warm-start cut-off, resumable from a checkpoint; plus the naive and brute-force
references the tests compare against.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbo_utils.core.artifacts import atomic_write_bytes
from cbo_utils.problem.bounds import convexify
from cbo_utils.problem.ising import BlockRemovalProblem
from cbo_utils.solvers.local_search import polish_states
from cbo_utils.solvers.states import check_k, results_frame

#: largest number of column subsets per matmul tile in :func:`exact_lowest`.
_COL_TILE = 1 << 16


#: candidates kept beyond ``k`` before the exact re-sort.
MARGIN = 16


#: hard cap on the candidate buffer (only reached when huge numbers of states tie at the cut-off).
CANDIDATE_CAP = 1 << 16


def _sets_to_full(problem: BlockRemovalProblem, sets_reduced: np.ndarray) -> np.ndarray:
    """Reduced index sets ``(n, m)`` (positions in ``problem.free``) → full int8 states."""
    free = problem.free
    X = np.zeros((sets_reduced.shape[0], len(free)), dtype=np.int8)
    if sets_reduced.size:
        X[np.arange(sets_reduced.shape[0])[:, None], sets_reduced] = 1
    return problem.expand(X)


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


def _resolve_device(device):
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TopK:
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
            if keep > CANDIDATE_CAP:
                keep = CANDIDATE_CAP
                self.truncated = True
            vals, sets = vals[:keep], sets[:keep]
        self.vals, self.sets, self.count = [vals], [sets], vals.size

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.prune()
        if not self.vals:
            return np.zeros(0), np.zeros((0, 0), dtype=np.int64)
        return self.vals[0], self.sets[0]


def set_sums(Mx: np.ndarray, T: np.ndarray) -> np.ndarray:
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
        return set_sums(self.Q, T)

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

    From the convexification of :func:`cbo_utils.problem.bounds.convexify` (``P ⪰ 0``), made strictly positive definite
    by moving ``δ`` from the linear to the quadratic part (``P + δI``, ``c − δ``; an identity on binary states), every
    state ``x = (x_X, x_Y)`` over the two halves has ``E(x) = xᵀPx + cᵀx − μm²``. Minimising ``xᵀPx`` over a *real*
    ``x_Y`` leaves the Schur complement ``G_X = P_XX − P_XY P_YY⁻¹ P_YX ⪰ 0``, so for a subset ``T`` of one half and
    any ``S`` of the other ``E(T ∪ S) ≥ c_T + 1_TᵀG_X1_T + min_S c_S − μm²`` — a bound per row (and per column) of a
    matmul block, checked before the block is computed: rows and columns whose bound exceeds the current cut-off (the
    k-th best energy so far, or the warm start's) are dropped, and the exact k lowest are unchanged.
    """

    def __init__(self, Q: np.ndarray, m: int, split: int, time_limit: float | None):
        import scipy.linalg


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
        out = self.c[T].sum(axis=1) + set_sums(self.G[side.lo], Tl)
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
    top = TopK(K, tol)
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
                    top.add(set_sums(sub, s_sub), s_sub + rows.lo)
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
                if vals_t.numel() > CANDIDATE_CAP:  # only on huge plateaus of equal energies
                    sel = torch.topk(vals_t, CANDIDATE_CAP, largest=False).indices
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


def _save_enum_checkpoint(path: Path, key: str, top: TopK, chunks_done: int, seen: int, mw: int) -> None:
    """The candidates so far and the number of finished chunks, atomically (safetensors + JSON header)."""
    from safetensors.numpy import save


    top.prune()
    vals = top.vals[0] if top.vals else np.zeros(0)
    sets = top.sets[0] if top.sets else np.zeros((0, mw), dtype=np.int64)
    atomic_write_bytes(path, save({"vals": np.ascontiguousarray(vals, dtype=np.float64),
                                   "sets": np.ascontiguousarray(sets, dtype=np.int64).reshape(-1, mw)},
                                  metadata={"format": _ENUM_FORMAT, "key": key, "chunks_done": str(chunks_done),
                                            "seen": str(seen), "truncated": str(bool(top.truncated))}))


class _OtherProblem(Exception):
    pass


def _load_enum_checkpoint(path: Path, key: str, top: TopK, mw: int) -> tuple[int, int]:
    """Restore the candidates of an interrupted enumeration; returns (finished chunks, states seen)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return 0, 0
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != _ENUM_FORMAT or meta.get("key") != key:
                raise _OtherProblem
            vals, sets = fh.get_tensor("vals"), fh.get_tensor("sets").reshape(-1, mw)
            int(meta["chunks_done"]), int(meta["seen"])
    except _OtherProblem:
        raise ValueError(f"the checkpoint {path} belongs to another problem, k or chunk size; delete it or pass "
                         "another checkpoint path") from None
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ValueError(f"the enumeration checkpoint {path} is corrupt ({str(exc)[:80]}); delete it to start the "
                         f"enumeration over: rm '{path}'") from None
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
    bound on every completion (:class:`_Pruner`: the convexification of :mod:`cbo_utils.problem.bounds` with a Schur
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

    k = check_k(k)
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
        K = k + MARGIN
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
    df = results_frame(problem, X, "exact", None, k, info)
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
    k = check_k(k)
    Qr, _, _, m = problem.reduced()
    n = Qr.shape[0]
    total = math.comb(n, m)
    limit = total if max_states is None else min(total, int(max_states))
    t0 = time.perf_counter()
    best_v = np.zeros(0)
    best_s = np.zeros((0, m), dtype=np.int64)
    it = itertools.combinations(range(n), m)
    seen = 0
    K = k + MARGIN
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
    return results_frame(problem, X, "naive", None, k, info)


def brute_force_lowest(problem: BlockRemovalProblem, k: int = 20, max_N: int = 22) -> pd.DataFrame:
    """Independent check for tests: all ``2^N`` full states, filtered with :meth:`BlockRemovalProblem.feasible`."""
    k = check_k(k)
    N = problem.N
    if N > max_N:
        raise ValueError(f"brute force over 2^{N} states is too slow; use exact_lowest (or raise max_N)")
    t0 = time.perf_counter()
    codes = np.arange(2 ** N, dtype=np.int64)
    X = ((codes[:, None] >> np.arange(N)) & 1).astype(np.int8)
    X = X[problem.feasible(X)]
    E = problem.energy_of(X)
    sel = np.argsort(E, kind="stable")[: k + MARGIN]
    info = {"n_states": 2 ** N, "n_feasible": int(X.shape[0]), "time_s": time.perf_counter() - t0}
    return results_frame(problem, X[sel], "brute_force", None, k, info)
