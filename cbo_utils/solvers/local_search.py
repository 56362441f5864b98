"""Local search on states of a :class:`~cbo_utils.problem.ising.BlockRemovalProblem`: repairing infeasible states and
polishing by exact one-swap moves (used by the samplers and by the enumeration's warm start)."""

from __future__ import annotations

import numpy as np


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
