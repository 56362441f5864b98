"""Certified lower bounds on the ground-state energy of ``min xᵀQx`` over ``x ∈ {0,1}ⁿ`` with ``Σx = m``.

Every heuristic answer (tabu, simulated annealing) can then carry a certified gap: best energy found − bound.

Derivation
----------
For binary ``x`` with ``1ᵀx = m`` we have ``x_i² = x_i``, ``(1ᵀx)² = m²`` and ``(1ᵀx)(vᵀx) = m·vᵀx``. Hence for ANY
``d, v ∈ Rⁿ`` and scalar ``μ``::

    xᵀQx = xᵀPx + cᵀx − μm²,   P = Q − Diag(d) + μ·11ᵀ + (1vᵀ + v1ᵀ)/2,   c = d − m·v.

If ``P ⪰ 0`` then ``xᵀPx ≥ 0`` and ``cᵀx ≥`` the sum of the ``m`` smallest entries of ``c`` (``x`` picks ``m``
entries), so ``E* ≥ Σ_m-smallest(c) − μm²``. For any multipliers, replacing ``d`` by ``d + λ_min(P)·1`` makes
``λ_min(P) = 0``; this moves every ``c_i`` by ``λ_min(P)``, so

    B(d, v, μ) = Σ_m-smallest(d − m·v) + m·λ_min(P(d, v, μ)) − μm²

is a valid lower bound for EVERY ``(d, v, μ)`` (:func:`convexification_bound`). It equals the one-sided
``B̃ = Σ_m-smallest(c) + m·min(0, λ_min(P)) − μm²`` (shift ``d`` only downwards, to repair an indefinite ``P``)
unless ``P ≻ 0``, where it is larger. ``B`` is concave (a minimum of linear functions plus the concave ``λ_min`` of
an affine matrix function) and invariant under ``d → d + α·1``.

Redundancy: ``μ·11ᵀ = (1(μ1)ᵀ + (μ1)1ᵀ)/2``, so ``(v, μ) → (v + α1, μ − α)`` leaves ``P`` and ``B`` unchanged.
:func:`convexify` optimises over ``(d, v)`` with ``μ = 0`` and reports the gauge ``mean(v) = 0``, ``μ`` = the
all-ones part.

What the maximum is: ``max B`` is the Lagrangian dual of — and, both being strictly feasible for ``0 < m < n``,
equal to — the Shor semidefinite relaxation with the cardinality products::

    min ⟨Q, X⟩  s.t.  X ⪰ 0,  diag(X) = y,  X·1 = m·y,  1ᵀy = m,  0 ≤ y ≤ 1

(``X ⪰ yyᵀ`` is implied: ``(yᵀz)² = (1ᵀXz)²/m² ≤ (1ᵀX1)(zᵀXz)/m² = zᵀXz``). :func:`convexify` maximises ``B``
with a log-barrier interior-point method (damped Newton on ``t·(mθ − 1ᵀs) + log det P + Σ log(c − θ + s) +
Σ log s``, where ``mθ − 1ᵀs`` with ``c ≥ θ − s``, ``s ≥ 0`` is the LP form of ``Σ_m-smallest(c)``), which reaches
the SDP optimum to a relative duality gap of ~``tol`` in ~100 Newton steps of ``O(n³)``. It starts from the classic
eigenvalue bounds (:func:`eigenvalue_bound`) and never returns less than them (up to the safety margin).

Rigour: whatever the optimiser does, the reported bound is recomputed at the final multipliers with the exact
``λ_min`` from :func:`numpy.linalg.eigvalsh`, minus a floating-point safety margin ``≈ 2(n+8)·eps·‖|P|‖_F`` (which
bounds the error of forming ``P`` and of the symmetric eigensolver) and the rounding of the sums. The returned
``d`` is shifted so that ``P(d, v, μ) ⪰ 0`` holds in exact arithmetic (computed ``λ_min`` ≈ the margin).

Branch and bound (:func:`node_lower_bounds`): a principal submatrix of a PSD ``P`` is PSD, so the same certificate
bounds every subproblem with some blocks fixed (see there).

Limits: the bound is the SDP value, so it is exact only when the relaxation is. On small Fisher-like instances the
median relative gap to the optimum is a few percent (worst tens of percent, typically at small ``m``); when ``Q`` is
singular (fewer calibration samples than blocks) the SDP can put all its mass in the null space and the bound
collapses towards 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from cbo_utils.problem.ising import BlockRemovalProblem, as_square_matrix

__all__ = ["Convexification", "convexify", "convexification_bound", "eigenvalue_bound", "node_lower_bounds",
           "lower_bound", "certify"]

_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class Convexification:
    """A certificate ``P = Q − Diag(d) + μ·11ᵀ + (1vᵀ + v1ᵀ)/2 ⪰ 0`` and the bound it proves.

    ``bound`` is a certified lower bound on ``min xᵀQx`` (no problem constant) over binary ``x`` with ``Σx = m``;
    it equals :func:`convexification_bound` ``(Q, m, d, v, mu)`` (for ``m ∈ {0, n}`` it is the exact value).
    ``lam_min`` is the computed ``λ_min(P)`` at these multipliers (between one and four rounding-safety margins, so
    ``P ⪰ 0`` holds exactly). ``iterations``: Newton steps of the interior-point method.
    """

    d: np.ndarray
    v: np.ndarray
    mu: float
    m: int
    bound: float
    lam_min: float
    iterations: int
    time_s: float


# --------------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------------

def _check_m(m, n: int) -> int:
    if isinstance(m, (bool, np.bool_)) or not isinstance(m, (int, np.integer)):
        if isinstance(m, (float, np.floating)) and float(m).is_integer():
            m = int(m)
        else:
            raise ValueError(f"m (number of ones) must be an integer, got {m!r}")
    m = int(m)
    if not 0 <= m <= n:
        raise ValueError(f"m = {m} is outside 0..n = 0..{n}: the cardinality must satisfy 0 <= m <= n")
    return m


def _check_vector(x, n: int, name: str) -> np.ndarray:
    try:
        x = np.array(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric vector of length {n}: {exc}") from exc
    if x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} entries but Q is {n}×{n}; give one entry per variable")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite entries at {np.flatnonzero(~np.isfinite(x)).tolist()[:10]}")
    return x


def _check_scalar(x, name: str) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real number, got {x!r}") from exc
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


# --------------------------------------------------------------------------------------------------------------------
# the rigorous bound
# --------------------------------------------------------------------------------------------------------------------

def _sum_smallest(c: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """Sum of the ``k`` smallest entries of ``c`` and their indices."""
    if k == 0:
        return 0.0, np.zeros(0, dtype=np.int64)
    idx = np.argpartition(c, k - 1)[:k] if k < c.shape[0] else np.arange(c.shape[0])
    return float(c[idx].sum()), idx


def _build_P(Q: np.ndarray, d: np.ndarray, v: np.ndarray, mu: float) -> np.ndarray:
    P = Q + (mu + 0.5 * (v[:, None] + v[None, :]))
    P[np.diag_indices_from(P)] -= d
    return P


def _margin(Q: np.ndarray, d: np.ndarray, v: np.ndarray, mu: float, lam: float) -> float:
    """Upper bound on |computed λ_min − exact λ_min(P)|, plus room for rounding when ``d`` is later shifted."""
    n = Q.shape[0]
    av = np.abs(v)
    mag = np.abs(Q) + (abs(mu) + 0.5 * (av[:, None] + av[None, :]))
    mag[np.diag_indices_from(mag)] += np.abs(d)
    scale = float(np.sqrt(np.sum(mag * mag)))
    return 2.0 * (n + 8) * _EPS * scale + 8.0 * _EPS * (float(np.max(np.abs(d))) + abs(lam))


def _rigorous(Q: np.ndarray, m: int, d: np.ndarray, v: np.ndarray, mu: float) -> tuple[float, float, float]:
    """``(bound, computed λ_min(P), margin)`` with ``bound`` = B(d, v, μ) minus all rounding slack."""
    lam = float(np.linalg.eigvalsh(_build_P(Q, d, v, mu))[0])
    margin = _margin(Q, d, v, mu, lam)
    c = d - m * v
    lin, idx = _sum_smallest(c, m)
    quad = mu * m * m
    bound = lin + m * (lam - margin) - quad
    # rounding of c (|ĉ − c| ≤ eps·(|d| + m|v|) each), of the sum of m terms, and of combining the three terms
    slack = 2.0 * m * _EPS * float(np.max(np.abs(d) + m * np.abs(v)))
    slack += (m + 2) * _EPS * float(np.abs(c[idx]).sum()) + 4.0 * _EPS * (abs(lin) + m * abs(lam) + abs(quad))
    return bound - slack, lam, margin


def convexification_bound(Q, m: int, d, v, mu: float) -> float:
    """Certified lower bound ``B(d, v, μ)`` on ``min xᵀQx`` over binary ``x`` with ``Σx = m`` (no constant).

    ``B = Σ_m-smallest(d − m·v) + m·λ_min(P) − μm²`` with ``P = Q − Diag(d) + μ·11ᵀ + (1vᵀ + v1ᵀ)/2``, valid for
    every ``(d, v, μ)``; ``λ_min`` is the exact eigenvalue from ``eigvalsh`` minus a safety margin for rounding.
    This is at least the bound ``Σ_m-smallest(d − m·v) + m·min(0, λ_min(P)) − μm²`` (equal unless ``P ≻ 0``).
    """
    Q = as_square_matrix(Q, "Q")
    n = Q.shape[0]
    m = _check_m(m, n)
    d = _check_vector(d, n, "d")
    v = _check_vector(v, n, "v")
    mu = _check_scalar(mu, "mu")
    return _rigorous(Q, m, d, v, mu)[0]


def eigenvalue_bound(Q, m: int) -> float:
    """The classic eigenvalue bound: the better of ``m·λ_min(Q)`` and ``Σ_m-smallest(Q_ii) + m·λ_min(Q − Diag Q)``,
    i.e. :func:`convexification_bound` at ``(d, v, μ) = (0, 0, 0)`` and ``(diag Q, 0, 0)`` (certified, no const)."""
    Q = as_square_matrix(Q, "Q")
    m = _check_m(m, Q.shape[0])
    return max(_rigorous(Q, m, d, np.zeros(Q.shape[0]), 0.0)[0] for d in _classic_ds(Q))


def _classic_ds(Q: np.ndarray) -> list[np.ndarray]:
    return [np.zeros(Q.shape[0]), np.diag(Q).copy()]


def _finalise(Q: np.ndarray, m: int, d: np.ndarray, v: np.ndarray, mu: float) -> tuple[np.ndarray, float, float]:
    """Shift ``d`` until the computed ``λ_min(P)`` lies in ``[margin, 4·margin]``, so that ``P ⪰ 0`` holds in exact
    arithmetic (its true ``λ_min`` is within ``margin`` of the computed one). Returns ``(d, bound, computed λ_min)``."""
    d = d.copy()
    for _ in range(8):
        bound, lam, margin = _rigorous(Q, m, d, v, mu)
        if margin <= lam <= 4.0 * margin:
            return d, bound, lam
        d = d + (lam - 2.0 * margin)
    # the computed λ_min keeps missing the window (pathological rounding): push it down until safely positive
    for _ in range(60):
        d = d - max(4.0 * margin, 4.0 * _EPS * float(np.max(np.abs(d))))
        bound, lam, margin = _rigorous(Q, m, d, v, mu)
        if lam >= margin:
            return d, bound, lam
    raise FloatingPointError("could not certify P ⪰ 0 in floating point; is Q badly scaled (entries near overflow)?")


# --------------------------------------------------------------------------------------------------------------------
# optimisation: log-barrier interior point on (d, w = m·v, θ, s)
# --------------------------------------------------------------------------------------------------------------------

class _Barrier:
    """``φ_t = t·(mθ − 1ᵀs) + log det P + Σ log g + Σ log s`` with ``P = Q − Diag(d) + (1wᵀ + w1ᵀ)/(2m)``,
    ``g = d − w − θ + s`` (so ``c = d − w``, ``v = w/m``, ``μ = 0``). Barrier parameter ``ν = 3n``."""

    def __init__(self, Q: np.ndarray, m: int):
        self.Q, self.m, self.n = Q, m, Q.shape[0]

    def split(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        n = self.n
        return z[:n], z[n:2 * n], float(z[2 * n]), z[2 * n + 1:]

    def P(self, d: np.ndarray, w: np.ndarray) -> np.ndarray:
        return _build_P(self.Q, d, w / self.m, 0.0)

    def value(self, z: np.ndarray, t: float) -> tuple[float, np.ndarray | None]:
        d, w, theta, s = self.split(z)
        g = d - w - theta + s
        if np.any(g <= 0) or np.any(s <= 0):
            return -math.inf, None
        try:
            L = scipy.linalg.cholesky(self.P(d, w), lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            return -math.inf, None
        diagL = np.diag(L)
        if np.any(diagL <= 0) or not np.all(np.isfinite(diagL)):
            return -math.inf, None
        val = (t * (self.m * theta - s.sum()) + 2.0 * np.log(diagL).sum() + np.log(g).sum() + np.log(s).sum())
        return float(val), L

    def newton(self, z: np.ndarray, t: float, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gradient and Newton direction (ascent) of φ_t at ``z``."""
        n, m = self.n, self.m
        d, w, theta, s = self.split(z)
        g = d - w - theta + s
        R = scipy.linalg.cho_solve((L, True), np.eye(n), check_finite=False)
        R = 0.5 * (R + R.T)
        R1 = R.sum(axis=1)
        a = float(R1.sum())
        ig, ig2, is2 = 1.0 / g, 1.0 / (g * g), 1.0 / (s * s)
        grad = np.concatenate([-np.diag(R) + ig, R1 / m - ig, [t * m - ig.sum()], -t + ig + 1.0 / s])
        N = 3 * n + 1
        K = np.zeros((N, N))                       # K = −∇²φ_t (positive definite)
        D, W, T = slice(0, n), slice(n, 2 * n), 2 * n
        K[D, D] = R * R
        K[D, W] = -(R * R1[:, None]) / m
        K[W, D] = K[D, W].T
        K[W, W] = (np.outer(R1, R1) + a * R) / (2.0 * m * m)
        i = np.arange(n)
        di, wi, si = i, n + i, 2 * n + 1 + i
        # the LP barrier Σ log g: rank-one terms a_i a_iᵀ / g_i² with a_i = e_{d_i} − e_{w_i} − e_θ + e_{s_i}
        K[di, di] += ig2
        K[wi, wi] += ig2
        K[si, si] += ig2 + is2
        K[di, wi] -= ig2
        K[wi, di] -= ig2
        K[di, si] += ig2
        K[si, di] += ig2
        K[wi, si] -= ig2
        K[si, wi] -= ig2
        K[T, T] = ig2.sum()
        K[T, di] = K[di, T] = -ig2
        K[T, wi] = K[wi, T] = ig2
        K[T, si] = K[si, T] = -ig2
        try:
            step = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K, check_finite=False), grad, check_finite=False)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(K, grad, rcond=None)[0]
        return grad, step


def _upper_estimate(Q: np.ndarray, m: int) -> float:
    """Energy of a feasible state (the ``m`` smallest diagonal entries, then greedy single swaps)."""
    n = Q.shape[0]
    x = np.zeros(n)
    x[np.argsort(np.diag(Q), kind="stable")[:m]] = 1.0
    for _ in range(2 * n):
        h = Q @ x                                     # change of xᵀQx for swapping i (in) ↔ j (out):
        qd = np.diag(Q)                               # 2h_j + Q_jj − 2h_i + Q_ii − 2Q_ij
        ones, zeros = np.flatnonzero(x > 0), np.flatnonzero(x == 0)
        if ones.size == 0 or zeros.size == 0:
            break
        delta = (2 * h[zeros][None, :] + qd[zeros][None, :] - 2 * h[ones][:, None] + qd[ones][:, None]
                 - 2 * Q[np.ix_(ones, zeros)])
        k = int(np.argmin(delta))
        if delta.flat[k] >= -1e-12 * max(1.0, abs(float(x @ h))):
            break
        i, j = np.unravel_index(k, delta.shape)
        x[ones[i]], x[zeros[j]] = 0.0, 1.0
    return float(x @ Q @ x)


def _interior_point(Q: np.ndarray, m: int, d0: np.ndarray, lower: float, upper: float, deadline: float,
                    max_iter: int, tol: float) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Barrier path following from ``d0`` (``P(d0, 0) ≻ 0``). Returns candidate ``(d, v)`` points and the number of
    Newton steps."""
    n = Q.shape[0]
    bar = _Barrier(Q, m)
    nu = 3.0 * n
    gap0 = max(upper - lower, 1e-9 * max(abs(upper), abs(lower), float(np.max(np.abs(Q)))), 1e-300)
    target = tol * max(abs(upper), abs(lower), gap0 * 1e-3)
    c0 = d0.copy()
    theta0 = float(np.partition(c0, m - 1)[m - 1])
    s0 = np.maximum(theta0 - c0, 0.0) + gap0 / n
    z = np.concatenate([d0, np.zeros(n), [theta0], s0])
    t = nu / gap0
    val, L = bar.value(z, t)
    if L is None:
        return [], 0
    candidates: list[tuple[np.ndarray, np.ndarray]] = []
    it = 0
    stalled = False
    while it < max_iter and time.perf_counter() < deadline and not stalled:
        for _ in range(60):                       # centring
            if it >= max_iter or time.perf_counter() >= deadline:
                break
            with np.errstate(all="ignore"):
                grad, step = bar.newton(z, t, L)
            it += 1
            dec = float(grad @ step)
            if not (np.isfinite(dec) and np.all(np.isfinite(step))) or dec <= 0:
                stalled = True
                break
            alpha = 1.0
            for _ in range(40):
                znew = z + alpha * step
                with np.errstate(all="ignore"):
                    vnew, Lnew = bar.value(znew, t)
                if Lnew is not None and vnew >= val + 0.01 * alpha * dec:
                    break
                alpha *= 0.5
            else:
                stalled = True
                break
            z, val, L = znew, vnew, Lnew
            if dec < 1e-6:
                break
        d, w, _, _ = bar.split(z)
        candidates.append((d.copy(), w / m))
        if nu / t <= target:
            break
        t *= 8.0
        val, L = bar.value(z, t)
    return candidates[-3:], it


def convexify(Q, m: int, *, time_limit: float | None = 10.0, max_iter: int = 2000,
              tol: float = 1e-9) -> Convexification:
    """Maximise the certified bound :func:`convexification_bound` over ``(d, v, μ)``.

    Interior-point (log-barrier, damped Newton) solution of the Shor SDP dual described in the module docstring,
    started from the classic eigenvalue bounds. ``time_limit`` (seconds, ``None`` = unlimited) and ``max_iter``
    (Newton steps) cap the work; ``tol`` is the relative duality gap at which it stops. Whatever happens, the bound
    is recomputed rigorously at the returned multipliers, and it is never below the eigenvalue bound (up to the
    rounding margin). ``m ∈ {0, n}`` gives the exact value (``0`` or ``ΣQ``).
    """
    t0 = time.perf_counter()
    Q = as_square_matrix(Q, "Q")
    n = Q.shape[0]
    m = _check_m(m, n)
    if time_limit is not None:
        time_limit = _check_scalar(time_limit, "time_limit")
        if time_limit <= 0:
            raise ValueError(f"time_limit must be > 0 seconds (or None for no limit), got {time_limit}")
    if isinstance(max_iter, (bool, np.bool_)) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0 (Newton steps), got {max_iter!r}")
    tol = _check_scalar(tol, "tol")
    if tol <= 0:
        raise ValueError(f"tol must be > 0 (relative duality gap), got {tol}")
    deadline = math.inf if time_limit is None else t0 + time_limit
    zeros = np.zeros(n)

    # classic starts: (0, 0, 0) and (diag Q, 0, 0)
    starts = []
    for d in _classic_ds(Q):
        b, lam, _ = _rigorous(Q, m, d, zeros, 0.0)
        starts.append((b, d + lam))
    best_start = max(starts, key=lambda s: s[0])
    candidates: list[tuple[np.ndarray, np.ndarray, float]] = [(d, zeros, 0.0) for _, d in starts]
    iterations = 0
    if 0 < m < n and max_iter > 0:
        lower = best_start[0]
        upper = _upper_estimate(Q, m)
        gap = upper - lower
        if gap > tol * max(abs(upper), abs(lower), 1e-300):
            d0 = best_start[1] - max(gap, 1e-300) / m   # strictly inside: λ_min(P) = gap/m
            pts, iterations = _interior_point(Q, m, d0, lower, upper, deadline, max_iter, tol)
            for d, v in pts:
                mu = float(np.mean(v))
                candidates.append((d, v - mu, mu))

    best = None
    for d, v, mu in candidates:
        if not (np.all(np.isfinite(d)) and np.all(np.isfinite(v))):
            continue
        dF, bound, lam = _finalise(Q, m, d, v, mu)
        if best is None or bound > best[1]:
            best = (dF, bound, lam, v, mu)
    dF, bound, lam, v, mu = best
    if m == 0:
        bound = 0.0
    elif m == n:
        bound = float(Q.sum()) - (n + 4) * _EPS * float(np.abs(Q).sum())   # the only state, minus summation error
    return Convexification(d=dF, v=np.array(v, dtype=np.float64), mu=float(mu), m=m, bound=float(bound),
                           lam_min=float(lam), iterations=int(iterations), time_s=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------------------------
# branch-and-bound nodes
# --------------------------------------------------------------------------------------------------------------------

def node_lower_bounds(conv: Convexification, E_fixed, f, free, r) -> np.ndarray:
    """Lower bounds for ``K`` branch-and-bound nodes from one certificate (vectorised).

    Node ``j`` has fixed ones ``S_j`` with energy ``E_fixed[j] = Σ_{i,l∈S_j} Q_il``, fields
    ``f[j, :] = Σ_{i∈S_j} Q[i, :]`` (shape ``(K, n)``), a boolean mask ``free[j, :]`` of undecided blocks and
    ``r[j]`` more ones to place among them. Returns ``(K,)`` float64 lower bounds on
    ``E_fixed + min_{T ⊂ free, |T| = r} [2 Σ_{t∈T} f_t + Σ_{t,u∈T} Q_tu]``.

    Why: ``P`` restricted to the free set ``F`` is PSD, and for ``y ∈ {0,1}^F`` with ``1ᵀy = r``,
    ``yᵀQ_F y = yᵀP_F y + Σ_t (d_t − r·v_t) y_t − μr²``; so the bound is
    ``E_fixed + Σ_r-smallest over free t of (d_t + 2f_t − r·v_t) − μr²``. Exactly ``E_fixed`` when ``r = 0``;
    ``+inf`` when fewer than ``r`` blocks are free. ``conv`` must come from :func:`convexify` (it certifies
    ``P ⪰ 0``); the bound holds for any ``r``, not only ``|S_j| + r = conv.m``.
    """
    d = np.asarray(conv.d, dtype=np.float64).reshape(-1)
    v = np.asarray(conv.v, dtype=np.float64).reshape(-1)
    n = d.shape[0]
    if v.shape[0] != n:
        raise ValueError(f"conv.d has {n} entries but conv.v has {v.shape[0]}; pass a Convexification from convexify")
    if not conv.lam_min >= 0:
        raise ValueError(f"conv.lam_min = {conv.lam_min} < 0: these multipliers do not certify P ⪰ 0; use the "
                         f"Convexification returned by convexify")
    mu = float(conv.mu)
    E_fixed = np.asarray(E_fixed, dtype=np.float64).reshape(-1)
    K = E_fixed.shape[0]
    f = np.asarray(f, dtype=np.float64)
    if f.ndim == 1 and K == 1:
        f = f[None, :]
    if f.shape != (K, n):
        raise ValueError(f"f must have shape (K, n) = ({K}, {n}) (one row of fields per node), got {f.shape}")
    free = np.asarray(free)
    if free.ndim == 1 and K == 1:
        free = free[None, :]
    if free.shape != (K, n):
        raise ValueError(f"free must be a boolean mask of shape (K, n) = ({K}, {n}), got {free.shape}")
    if free.dtype != bool:
        if not np.all((free == 0) | (free == 1)):
            raise ValueError("free must be a boolean mask (True = undecided block)")
        free = free.astype(bool)
    r_in = np.asarray(r).reshape(-1)
    if r_in.shape[0] != K:
        raise ValueError(f"r must have one entry per node ({K}), got {r_in.shape[0]}")
    r = r_in.astype(np.int64)
    if np.any(r != r_in) or np.any(r < 0):
        raise ValueError("r must hold non-negative integers (how many more ones each node places)")
    if not (np.all(np.isfinite(E_fixed)) and np.all(np.isfinite(f))):
        raise ValueError("E_fixed and f must be finite")

    out = E_fixed.copy()
    n_free = free.sum(axis=1)
    infeasible = n_free < r
    active = np.flatnonzero((r > 0) & ~infeasible)
    if active.size:
        ra = r[active]
        rf = ra.astype(np.float64)
        vals = d[None, :] + 2.0 * f[active] - rf[:, None] * v[None, :]
        vals = np.where(free[active], vals, np.inf)
        srt = np.sort(vals, axis=1)
        csum = np.cumsum(srt, axis=1)
        lin = csum[np.arange(active.size), ra - 1]
        quad = mu * rf * rf
        mag = (np.abs(d)[None, :] + 2.0 * np.abs(f[active]) + rf[:, None] * np.abs(v)[None, :])
        mag = np.where(free[active], mag, 0.0).max(axis=1)
        slack = 4.0 * (rf + 2) * _EPS * (rf * mag + np.abs(E_fixed[active]) + np.abs(quad))
        out[active] = E_fixed[active] + lin - quad - slack
    out[infeasible] = np.inf
    return out


# --------------------------------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------------------------------

def lower_bound(problem: BlockRemovalProblem, *, time_limit: float | None = 10.0) -> dict:
    """Certified lower bound on the optimum energy of ``problem`` (full-problem units, constant included).

    Works on :meth:`~cbo_utils.problem.ising.BlockRemovalProblem.reduced`. Returns ``{"bound", "method", "time_s",
    "iterations", "eigenvalue_bound", "n_free", "M_free"}``; ``method`` is ``"convexification"``, or ``"trivial"``
    when ``M_free`` is 0 or ``n_free`` (then ``bound`` and ``eigenvalue_bound`` are the exact energy).
    """
    t0 = time.perf_counter()
    Qf, const, F, mf = problem.reduced()
    n = len(F)
    if mf == 0 or mf == n:
        E = float(problem.energy_of(problem.expand(np.full(n, 1 if mf else 0, dtype=np.int8))))
        return {"bound": E, "method": "trivial", "time_s": time.perf_counter() - t0, "iterations": 0,
                "eigenvalue_bound": E, "n_free": n, "M_free": mf}
    conv = convexify(Qf, mf, time_limit=time_limit)
    eig = eigenvalue_bound(Qf, mf)

    def full(b: float) -> float:
        return b + const - 2.0 * _EPS * (abs(b) + abs(const))

    # both are certified; the max only matters at the level of the rounding margin
    return {"bound": max(full(conv.bound), full(eig)), "method": "convexification", "time_s": time.perf_counter() - t0,
            "iterations": conv.iterations, "eigenvalue_bound": full(eig), "n_free": n, "M_free": mf}


def certify(problem: BlockRemovalProblem, df, *, time_limit: float | None = 10.0) -> dict:
    """Give a solver table (:mod:`cbo_utils.solvers.exact`) its certified gap: adds ``lower_bound``, ``gap`` (best
    energy − bound), ``proven_optimal`` and ``bound_method`` to ``df.attrs["solver_info"]`` and returns that dict. A
    complete exact enumeration is its own bound (``"exhaustive"``); otherwise :func:`lower_bound` is computed."""
    info = df.attrs["solver_info"]
    best = float(df["energy"].iloc[0])
    if info.get("solver") in ("exact", "brute_force", "naive") and info.get("complete", True):
        info.update(lower_bound=best, gap=0.0, proven_optimal=True, bound_method="exhaustive")
        return info
    lb = lower_bound(problem, time_limit=time_limit)
    tol = 1e-9 * max(1.0, abs(best))
    info.update(lower_bound=lb["bound"], gap=best - lb["bound"], proven_optimal=bool(best <= lb["bound"] + tol),
                bound_method=lb["method"], bound_time_s=lb["time_s"])
    return info
