"""Block-removal energies as binary quadratic problems (QUBO, Ising, dimod models).

A model has ``N`` blocks. A state is ``x ∈ {0,1}^N`` with ``x_i = 1`` meaning *remove block i* (0-based indices of
the original model); exactly ``M`` blocks are removed (``Σx = M``). The energies of the paper are

* ``fisher``: ``E(x) = xᵀHx`` with ``H = AᵀA/m`` (symmetric PSD);
* ``taylor``: ``E(x) = −gᵀx + ½ xᵀHx``.

Because ``x_i² = x_i`` every such energy is ``xᵀQx + const`` with a symmetric ``Q`` (linear terms live on the
diagonal), and that is the only form used below. Everything is float64.

:class:`BlockRemovalProblem` adds the constraints (``M``, blocks that must stay, blocks that must go, block types
that may be removed) and converts the problem to the forms solvers want: the reduced problem over the free blocks,
a penalty QUBO with a provably large enough penalty, Ising fields/couplings, and dimod BQM/CQM models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cbo_utils.problem.energies import ENERGIES, get_energy, gradient_energy

__all__ = [
    "quadratic_form", "energies", "energies_of_sets", "fisher_energy", "taylor_energy", "BlockRemovalProblem",
    "IsingModel", "CONSTRAINT_LABEL",
]

#: Label of the cardinality constraint in :meth:`BlockRemovalProblem.to_cqm`.
CONSTRAINT_LABEL = "remove_exactly_M"

_SYM_RTOL = 1e-8
_ENERGY_CHUNK_ROWS = 1 << 16


# --------------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------------

def _describe_bad_entries(mask: np.ndarray, limit: int = 5) -> str:
    idx = np.argwhere(mask)
    shown = ", ".join(str(tuple(int(v) for v in row)) for row in idx[:limit])
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return f"{len(idx)} entr{'y' if len(idx) == 1 else 'ies'} at {shown}{more}"


def as_square_matrix(H, name: str = "H") -> np.ndarray:
    """``H`` as a finite, symmetric float64 ``(N, N)`` array (symmetrised when asymmetric only by rounding)."""
    try:
        H = np.array(H, dtype=np.float64)  # copy: callers may keep mutating theirs
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric N×N matrix (got {type(H).__name__}): {exc}") from exc
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{name} must be a square N×N matrix (one row and column per block), got shape {H.shape}; "
                         f"check that you passed the Hessian/Fisher matrix and not the activation matrix A")
    if H.shape[0] == 0:
        raise ValueError(f"{name} is empty (0×0): the model needs at least one block")
    bad = ~np.isfinite(H)
    if bad.any():
        raise ValueError(f"{name} has non-finite values (NaN or ±inf): {_describe_bad_entries(bad)}. The estimate is "
                         f"broken — recompute it (accumulate in float64, check for overflow or empty calibration "
                         f"batches), or exclude the affected blocks before building the problem")
    scale = max(1.0, float(np.max(np.abs(H))))
    asym = np.abs(H - H.T)
    worst = float(asym.max())
    if worst > _SYM_RTOL * scale:
        i, j = np.unravel_index(int(np.argmax(asym)), asym.shape)
        raise ValueError(f"{name} is not symmetric: |{name}[{i},{j}] − {name}[{j},{i}]| = {worst:.3g} "
                         f"(tolerance {_SYM_RTOL * scale:.3g}). Pass a symmetric matrix; if you have an upper-"
                         f"triangular QUBO U, use (U + U.T) / 2")
    if worst > 0:
        H = 0.5 * (H + H.T)
    return H


def _as_states(X, N: int) -> tuple[np.ndarray, bool]:
    """0/1 states as a float64 ``(n, N)`` array, and whether a single ``(N,)`` state was given."""
    X = np.asarray(X)
    single = X.ndim == 1
    if single:
        X = X[None, :]
    if X.ndim != 2 or X.shape[1] != N:
        raise ValueError(f"states must have shape (n, {N}) or ({N},) (one 0/1 entry per block), got {X.shape}")
    if X.dtype == bool:
        return X.astype(np.float64), single
    Xf = X.astype(np.float64)
    if X.size and not np.all((Xf == 0) | (Xf == 1)):
        raise ValueError("states must contain only 0 and 1 (1 = remove the block); got other values")
    return Xf, single


# --------------------------------------------------------------------------------------------------------------------
# energies
# --------------------------------------------------------------------------------------------------------------------

def quadratic_form(H, g=None, energy: str = "fisher") -> tuple[np.ndarray, float]:
    """The energy as ``(Q, const)`` with ``E(x) = xᵀQx + const``, built by the registered energy
    (:data:`cbo_utils.problem.energies.ENERGIES`).

    ``"fisher"``: ``Q = H``. ``"taylor"``: ``Q = ½H − diag(g)`` (``−gᵀx = −xᵀdiag(g)x`` for binary ``x``); ``g`` is
    required. ``const`` is 0 for both. ``H`` must be square, symmetric (asymmetry up to rounding is symmetrised) and
    finite.
    """
    H = as_square_matrix(H, "H")
    e = get_energy(energy)
    if e.needs_g and g is None:
        raise ValueError(f"energy={e.name!r} needs the gradient g (one value per block): {e.description}")
    if not e.needs_g and g is not None:
        raise ValueError(f"g was given but energy={e.name!r} ignores it; use an energy that needs it "
                         f"({', '.join(n for n, x in ENERGIES.items() if x.needs_g)})")
    Q, const = e.build(H, g)
    return as_square_matrix(Q, "Q"), float(const)


def energies(Q, X, const: float = 0.0):
    """``xᵀQx + const`` for every row ``x`` of ``X``.

    ``X`` is an ``(n, N)`` 0/1 array (any integer/bool/float dtype) → float64 array ``(n,)``; a single ``(N,)`` state
    → a float64 scalar. ``Q`` is used as given (no symmetry check: the form is the same for ``Q`` and ``(Q+Qᵀ)/2``).
    """
    Q = np.asarray(Q, dtype=np.float64)
    Xf, single = _as_states(X, Q.shape[0])
    out = np.empty(Xf.shape[0], dtype=np.float64)
    for lo in range(0, Xf.shape[0], _ENERGY_CHUNK_ROWS):
        blk = Xf[lo:lo + _ENERGY_CHUNK_ROWS]
        out[lo:lo + len(blk)] = np.einsum("ni,ni->n", blk @ Q, blk)
    out += float(const)
    return out[0] if single else out


def energies_of_sets(Q, sets: Iterable[Iterable[int]], const: float = 0.0) -> np.ndarray:
    """``Σ_{i,j∈S} Q_ij + const`` for every index set ``S`` (e.g. ``[[3, 7, 12], [0, 1, 2]]``) → float64 ``(n,)``."""
    Q = np.asarray(Q, dtype=np.float64)
    N = Q.shape[0]
    sets = [np.asarray(sorted(int(i) for i in s), dtype=np.int64) for s in sets]
    out = np.empty(len(sets), dtype=np.float64)
    for k, s in enumerate(sets):
        if s.size and (s[0] < 0 or s[-1] >= N):
            raise ValueError(f"set {k} has block indices outside 0..{N - 1}: {s.tolist()}")
        if s.size != np.unique(s).size:
            raise ValueError(f"set {k} repeats a block index: {s.tolist()}")
        out[k] = Q[np.ix_(s, s)].sum()
    return out + float(const)


def fisher_energy(H, X):
    """Paper (Fisher) energy ``xᵀHx`` of each state (see :func:`energies` for shapes)."""
    Q, c = quadratic_form(H, energy="fisher")
    return energies(Q, X, c)


def taylor_energy(H, g, X):
    """Second-order Taylor energy ``−gᵀx + ½xᵀHx`` of each state (see :func:`energies` for shapes)."""
    Q, c = quadratic_form(H, g, energy="taylor")
    return energies(Q, X, c)


# --------------------------------------------------------------------------------------------------------------------
# the constrained problem
# --------------------------------------------------------------------------------------------------------------------

class IsingModel(NamedTuple):
    """``E(s) = Σ h_i s_i + Σ_{i<j} J_ij s_i s_j + offset`` over spins ``s = 2x − 1`` of the free blocks.

    ``J`` is dense and strictly upper triangular (zero diagonal and lower triangle), so ``E(s) = h·s + sᵀJs + offset``.
    ``magnetization = Σs = 2·M_free − n_free`` for every feasible state. Spin ``i`` is block ``problem.free[i]``.
    Unpacks as ``h, J, offset, magnetization = problem.to_ising()``.
    """

    h: np.ndarray
    J: np.ndarray
    offset: float
    magnetization: int

    def energy(self, S) -> np.ndarray:
        S = np.atleast_2d(np.asarray(S, dtype=np.float64))
        return S @ self.h + np.einsum("ni,ij,nj->n", S, self.J, S) + self.offset


def _index_tuple(values, name: str, N: int) -> tuple[int, ...]:
    if values is None:
        return ()
    if isinstance(values, (int, np.integer)):
        values = (values,)
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            if isinstance(v, (float, np.floating)) and float(v).is_integer():
                v = int(v)
            else:
                raise ValueError(f"{name} must contain 0-based integer block indices, got {v!r}")
        out.append(int(v))
    bad = [v for v in out if not 0 <= v < N]
    if bad:
        raise ValueError(f"{name} has block indices outside 0..{N - 1}: {bad} (indices are 0-based)")
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise ValueError(f"{name} lists blocks more than once: {dup}")
    return tuple(sorted(out))


@dataclass(eq=False)
class BlockRemovalProblem:
    """Remove exactly ``M`` of ``N`` blocks minimising ``xᵀQx + const``.

    ``keep``: blocks that must stay. ``remove``: blocks that must be removed (they count towards ``M``).
    ``block_types``: optional type name per block (e.g. ``"attention"``, ``"mlp"``, ``"moe"``, ``"mamba"``);
    ``only_types``: if given, only blocks of these types may be removed (blocks in ``remove`` are exempt).
    ``energy`` is a label (``"fisher"``, ``"taylor"``, …) carried into results; :meth:`energy_of` computes
    ``xᵀQx + const`` of full states ``X``.

    The *free* blocks are those that the optimiser may still choose; the *reduced* problem is the energy as a
    function of the free blocks only, with the must-remove blocks fixed at 1 and every other block at 0.
    """

    Q: np.ndarray = field(repr=False)
    M: int
    const: float = 0.0
    keep: tuple[int, ...] = ()
    remove: tuple[int, ...] = ()
    block_types: list[str] | None = None
    only_types: tuple[str, ...] | None = None
    energy: str = "fisher"  # label of the energy (fisher | taylor | ...), carried into results
    _free: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    def __repr__(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)!r}" for name in ("keep", "remove", "only_types")
                        if getattr(self, name))
        return (f"BlockRemovalProblem(N={self.N}, M={self.M}, energy={str(self.energy)!r}, const={self.const!r}"
                f"{extra}, n_free={len(self._free)}, M_free={self.M_free})")

    # ---------------------------------------------------------------- construction / validation
    @classmethod
    def from_hessian(cls, H, M: int, g=None, energy: str = "fisher", keep: Iterable[int] = (),
                     remove: Iterable[int] = (), block_types: Sequence[str] | None = None,
                     only_types: Iterable[str] | None = None) -> BlockRemovalProblem:
        """Build the problem from the Hessian/Fisher matrix ``H`` (and gradient ``g`` for ``energy="taylor"``)."""
        gradient_energy(energy)  # the pair energy is built from its measured table, not from a Hessian
        Q, const = quadratic_form(H, g, energy)
        return cls(Q=Q, M=M, const=const, keep=tuple(keep), remove=tuple(remove), block_types=block_types,
                   only_types=None if only_types is None else tuple(only_types), energy=str(energy).lower())

    def validate(self) -> None:
        """Normalise the fields and raise ``ValueError`` with a helpful message when the problem is ill-posed."""
        self.Q = as_square_matrix(self.Q, "Q")
        N = self.Q.shape[0]
        self.const = float(self.const)
        if not np.isfinite(self.const):
            raise ValueError(f"const must be finite, got {self.const}")
        if isinstance(self.M, (bool, np.bool_)) or not isinstance(self.M, (int, np.integer)):
            if isinstance(self.M, (float, np.floating)) and float(self.M).is_integer():
                self.M = int(self.M)
            else:
                raise ValueError(f"M (number of blocks to remove) must be an integer, got {self.M!r}")
        self.M = int(self.M)
        if self.M < 1:
            raise ValueError(f"M = {self.M}: remove at least one block (1 <= M <= N-1 = {N - 1})")
        if self.M >= N:
            raise ValueError(f"M = {self.M} but the model has N = {N} blocks: removing all N blocks leaves no model; "
                             f"choose 1 <= M <= {N - 1}")
        self.keep = _index_tuple(self.keep, "keep", N)
        self.remove = _index_tuple(self.remove, "remove", N)
        both = sorted(set(self.keep) & set(self.remove))
        if both:
            raise ValueError(f"blocks {both} are in both keep and remove; a block cannot be kept and removed")
        if len(self.remove) > self.M:
            raise ValueError(f"{len(self.remove)} blocks must be removed ({list(self.remove)}) but M = {self.M}; "
                             f"raise M to at least {len(self.remove)} or shorten remove")
        if self.block_types is not None:
            if isinstance(self.block_types, str):
                raise ValueError("block_types must be a list with one type name per block, not a single string")
            types = [str(t) for t in self.block_types]
            if len(types) != N:
                raise ValueError(f"block_types has {len(types)} entries but there are N = {N} blocks; give one type "
                                 f"name per block")
            self.block_types = types
        if self.only_types is not None:
            if isinstance(self.only_types, str):
                self.only_types = (self.only_types,)
            self.only_types = tuple(str(t) for t in self.only_types)
            if self.block_types is None:
                raise ValueError("only_types needs block_types (one type name per block) to know which blocks it "
                                 "allows")
            known = sorted(set(self.block_types))
            unknown = sorted(set(self.only_types) - set(known))
            if unknown:
                raise ValueError(f"only_types names unknown block types {unknown}; the known types are {known}")
        allowed = np.ones(N, dtype=bool)
        allowed[list(self.keep)] = False
        if self.only_types is not None:
            allowed &= np.isin(np.asarray(self.block_types, dtype=object), list(self.only_types))
        allowed[list(self.remove)] = False
        self._free = np.flatnonzero(allowed)
        n_allowed = len(self._free) + len(self.remove)
        if n_allowed < self.M:
            why = []
            if self.keep:
                why.append(f"{len(self.keep)} kept")
            if self.only_types is not None:
                why.append(f"only types {list(self.only_types)} removable")
            raise ValueError(f"only {n_allowed} blocks may be removed ({', '.join(why) or 'restrictions'}) but M = "
                             f"{self.M}; lower M or relax keep/only_types")

    # ---------------------------------------------------------------- basic properties
    @property
    def N(self) -> int:
        return int(self.Q.shape[0])

    @property
    def free(self) -> np.ndarray:
        """Sorted 0-based indices of the blocks the optimiser may still choose."""
        return self._free.copy()

    @property
    def M_free(self) -> int:
        """How many free blocks must be chosen: ``M − len(remove)``."""
        return self.M - len(self.remove)

    @property
    def forbidden(self) -> np.ndarray:
        """Sorted indices of blocks that may not be removed (keep, or of a type outside ``only_types``)."""
        mask = np.ones(self.N, dtype=bool)
        mask[self._free] = False
        mask[list(self.remove)] = False
        return np.flatnonzero(mask)

    def energy_of(self, X):
        """``xᵀQx + const`` of each full state (``(n, N)`` → ``(n,)``; ``(N,)`` → scalar)."""
        return energies(self.Q, X, self.const)

    def feasible(self, X) -> np.ndarray:
        """Whether each full state removes exactly ``M`` blocks, keeps ``keep``, removes ``remove`` and respects
        ``only_types``. ``(n, N)`` → bool ``(n,)``; ``(N,)`` → bool."""
        Xf, single = _as_states(X, self.N)
        ok = Xf.sum(axis=1) == self.M
        if self.remove:
            ok &= (Xf[:, list(self.remove)] == 1).all(axis=1)
        forb = self.forbidden
        if forb.size:
            ok &= (Xf[:, forb] == 0).all(axis=1)
        return bool(ok[0]) if single else ok

    # ---------------------------------------------------------------- reduced problem
    def reduced(self) -> tuple[np.ndarray, float, np.ndarray, int]:
        """The problem over the free blocks: ``(Q_free, const_free, free_idx, M_free)``.

        With ``F`` the free and ``R`` the must-remove blocks (all others fixed at 0),
        ``Q_free = Q[F,F] + diag(2·Σ_{r∈R} Q[F,r])`` and ``const_free = const + Σ_{r,r'∈R} Q[r,r']``, so that
        ``x_Fᵀ Q_free x_F + const_free`` equals the full energy of :meth:`expand` ``(x_F)``.
        """
        F = self._free
        R = np.asarray(self.remove, dtype=np.int64)
        Qf = self.Q[np.ix_(F, F)].copy()
        const = self.const
        if R.size:
            Qf[np.diag_indices_from(Qf)] += 2.0 * self.Q[np.ix_(F, R)].sum(axis=1)
            const += float(self.Q[np.ix_(R, R)].sum())
        return Qf, const, F.copy(), self.M_free

    def expand(self, X_free) -> np.ndarray:
        """Map reduced states ``(n, n_free)`` (or ``(n_free,)``) to full 0/1 int8 states, adding the must-remove
        blocks."""
        X_free = np.asarray(X_free)
        single = X_free.ndim == 1
        X2 = np.atleast_2d(X_free)
        if X2.shape[1] != len(self._free):
            raise ValueError(f"reduced states must have {len(self._free)} columns (one per free block), got "
                             f"{X2.shape}")
        out = np.zeros((X2.shape[0], self.N), dtype=np.int8)
        out[:, self._free] = X2
        if self.remove:
            out[:, list(self.remove)] = 1
        return out[0] if single else out

    def sets_to_states(self, sets: Iterable[Iterable[int]]) -> np.ndarray:
        """Full int8 0/1 states from sets of removed block indices (original, 0-based)."""
        sets = list(sets)
        out = np.zeros((len(sets), self.N), dtype=np.int8)
        for k, s in enumerate(sets):
            out[k, list(s)] = 1
        return out

    # ---------------------------------------------------------------- penalty QUBO
    def penalty_lambda(self) -> float:
        """A penalty weight λ that makes every local minimum of ``xᵀQx + λ(Σx − M)²`` feasible.

        Computed on the reduced problem (only the free blocks need constraining): ``λ = Δ·(1 + 1e-6) + tiny`` with
        ``Δ = max_i (|Q_ii| + 2 Σ_{j≠i} |Q_ij|)`` over ``Q_free``.

        Why it suffices: flipping one bit ``i`` changes ``xᵀQx`` by ``±(Q_ii + 2Σ_{j≠i} Q_ij x_j)``, whose size is at
        most ``Δ``. In an infeasible state ``d = |Σx − M| ≥ 1`` and some single flip moves ``Σx`` one step towards
        ``M``; it lowers the penalty by ``λ(d² − (d−1)²) = λ(2d − 1) ≥ λ > Δ``, so the total energy strictly drops.
        Hence no infeasible state is a single-flip local minimum — in particular every global minimum over all
        ``2^n`` states is feasible and equals the constrained minimum (the penalty vanishes on feasible states).
        """
        Qf = self.reduced()[0]
        if Qf.size == 0:
            return 1.0
        A = np.abs(Qf)
        delta = float(np.max(2.0 * A.sum(axis=1) - np.diag(A)))
        return delta * (1.0 + 1e-6) + 1e-12 * max(1.0, delta) + 1e-300

    def penalty_qubo(self, lam: float | None = None) -> tuple[np.ndarray, float, float]:
        """``(Qp, offset, λ)`` on the reduced problem: ``xᵀQp x + offset = x_FᵀQ_free x_F + const_free
        + λ(Σx − M_free)²``. ``λ`` defaults to :meth:`penalty_lambda`."""
        Qf, const, _, m = self.reduced()
        lam = self.penalty_lambda() if lam is None else float(lam)
        if not np.isfinite(lam) or lam < 0:
            raise ValueError(f"penalty λ must be finite and >= 0, got {lam}")
        n = Qf.shape[0]
        Qp = Qf + lam * np.ones((n, n)) - 2.0 * lam * m * np.eye(n)
        return Qp, const + lam * m * m, lam

    # ---------------------------------------------------------------- Ising / dimod
    def to_ising(self) -> IsingModel:
        """The reduced problem in spins ``s = 2x − 1``: ``J_ij = ½Q_ij`` (i<j), ``h_i = ½Σ_j Q_ij``,
        ``offset = ¼ΣQ_ii + ¼Σ_ij Q_ij + const_free``; magnetisation of feasible states ``2·M_free − n_free``."""
        Qf, const, _, m = self.reduced()
        n = Qf.shape[0]
        J = np.triu(0.5 * Qf, k=1)
        h = 0.5 * Qf.sum(axis=1)
        offset = 0.25 * float(np.trace(Qf)) + 0.25 * float(Qf.sum()) + const
        return IsingModel(h=h, J=J, offset=offset, magnetization=int(2 * m - n))

    def _bqm_from_matrix(self, Qm: np.ndarray, offset: float, labels: np.ndarray):
        import dimod

        n = Qm.shape[0]
        iu, ju = np.triu_indices(n, k=1)
        quad = 2.0 * Qm[iu, ju]
        nz = quad != 0
        bqm = dimod.BinaryQuadraticModel.from_numpy_vectors(
            np.diag(Qm).copy(), (iu[nz], ju[nz], quad[nz]), float(offset), dimod.BINARY,
            variable_order=[int(v) for v in labels])
        return bqm

    def to_bqm(self, penalty: bool = True, lam: float | None = None):
        """The reduced problem as a ``dimod.BinaryQuadraticModel`` (BINARY) over the free blocks' original indices.

        With ``penalty=True`` it includes ``λ(Σx − M_free)²`` (λ from :meth:`penalty_lambda` unless given), so its
        ground states are the constrained optima. For a sample ``s`` the BQM energy equals the full energy of the
        state that removes ``s``'s ones plus the must-remove blocks (plus the penalty)."""
        if penalty:
            Qm, offset, _ = self.penalty_qubo(lam)
        else:
            Qm, offset, _, _ = self.reduced()
        return self._bqm_from_matrix(Qm, offset, self._free)

    def to_cqm(self):
        """``dimod.ConstrainedQuadraticModel``: the reduced objective with the constraint ``Σx == M_free``
        (label ``"remove_exactly_M"``)."""
        import dimod

        cqm = dimod.ConstrainedQuadraticModel()
        cqm.set_objective(self.to_bqm(penalty=False))
        cqm.add_constraint_from_iterable([(int(v), 1.0) for v in self._free], "==", rhs=self.M_free,
                                         label=CONSTRAINT_LABEL)
        return cqm
