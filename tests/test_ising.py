"""Energies, the constrained problem and its QUBO / Ising / dimod forms, checked against explicit loops and brute
force over all 2^n states."""

import itertools
import math

import dimod
import numpy as np
import pytest

from cbo_utils.problem.ising import (
    CONSTRAINT_LABEL,
    BlockRemovalProblem,
    energies,
    energies_of_sets,
    fisher_energy,
    quadratic_form,
    taylor_energy,
)


def psd(rng, N, m=None):
    m = m or 3 * N
    A = rng.normal(size=(m, N))
    return A.T @ A / m


def sym(rng, N):
    B = rng.normal(size=(N, N))
    return (B + B.T) / 2


def all_states(n):
    return np.array(list(itertools.product([0, 1], repeat=n)), dtype=np.int8).reshape(-1, n)


def loop_energy(Q, x, const=0.0):
    return sum(Q[i, j] * x[i] * x[j] for i in range(len(x)) for j in range(len(x))) + const


# ---------------------------------------------------------------------------------------------------------- energies

def test_energies_match_loops_and_dtypes():
    rng = np.random.default_rng(0)
    Q = sym(rng, 7)
    X = rng.integers(0, 2, size=(20, 7))
    ref = np.array([loop_energy(Q, x, 0.5) for x in X])
    for Xd in (X, X.astype(bool), X.astype(np.int8), X.astype(np.float32)):
        got = energies(Q, Xd, 0.5)
        assert got.dtype == np.float64 and got.shape == (20,)
        np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-13)
    single = energies(Q, X[3], 0.5)
    assert np.ndim(single) == 0 and math.isclose(single, ref[3], rel_tol=1e-13)
    np.testing.assert_allclose(energies_of_sets(Q, [np.flatnonzero(x) for x in X], 0.5), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="only 0 and 1"):
        energies(Q, 2 * X)
    with pytest.raises(ValueError, match="shape"):
        energies(Q, X[:, :5])


def test_fisher_and_taylor_energy():
    rng = np.random.default_rng(1)
    H, g = psd(rng, 6), rng.normal(size=6)
    X = all_states(6)
    np.testing.assert_allclose(fisher_energy(H, X), [x @ H @ x for x in X], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(taylor_energy(H, g, X), [-g @ x + 0.5 * x @ H @ x for x in X], rtol=1e-12,
                               atol=1e-12)
    Q, c = quadratic_form(H, g, "taylor")
    np.testing.assert_allclose(Q, 0.5 * H - np.diag(g))
    assert c == 0.0


def test_quadratic_form_validation():
    rng = np.random.default_rng(2)
    H = psd(rng, 5)
    bad = H.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 3\)"):
        quadratic_form(bad)
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        BlockRemovalProblem.from_hessian(bad, 2)
    with pytest.raises(ValueError, match="square"):
        quadratic_form(rng.normal(size=(5, 4)))
    asym = H.copy()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        quadratic_form(asym)
    tiny_asym = H.copy()
    tiny_asym[0, 1] += 1e-14
    Q, _ = quadratic_form(tiny_asym)
    assert np.array_equal(Q, Q.T)
    with pytest.raises(ValueError, match="needs the gradient"):
        quadratic_form(H, energy="taylor")
    with pytest.raises(ValueError, match="one entry per block"):
        quadratic_form(H, np.ones(4), energy="taylor")
    with pytest.raises(ValueError, match="unknown energy"):
        quadratic_form(H, energy="hessian")


# ---------------------------------------------------------------------------------------------------------- problem

def test_problem_validation_messages():
    rng = np.random.default_rng(3)
    H = psd(rng, 6)
    with pytest.raises(ValueError, match="no model"):
        BlockRemovalProblem.from_hessian(H, 6)
    with pytest.raises(ValueError, match="at least one"):
        BlockRemovalProblem.from_hessian(H, 0)
    with pytest.raises(ValueError, match=r"outside 0\.\.5"):
        BlockRemovalProblem.from_hessian(H, 2, keep=[9])
    with pytest.raises(ValueError, match="more than once"):
        BlockRemovalProblem.from_hessian(H, 2, remove=[1, 1])
    with pytest.raises(ValueError, match="both keep and remove"):
        BlockRemovalProblem.from_hessian(H, 2, keep=[1], remove=[1])
    with pytest.raises(ValueError, match="must be removed"):
        BlockRemovalProblem.from_hessian(H, 2, remove=[0, 1, 2])
    with pytest.raises(ValueError, match="only 3 blocks may be removed"):
        BlockRemovalProblem.from_hessian(H, 4, keep=[0, 1, 2])
    types = ["attention", "mlp"] * 3
    with pytest.raises(ValueError, match=r"unknown block types \['moe'\].*\['attention', 'mlp'\]"):
        BlockRemovalProblem.from_hessian(H, 2, block_types=types, only_types=["moe"])
    with pytest.raises(ValueError, match="needs block_types"):
        BlockRemovalProblem.from_hessian(H, 2, only_types=["mlp"])
    with pytest.raises(ValueError, match="one type name per block"):
        BlockRemovalProblem.from_hessian(H, 2, block_types=types[:5])
    with pytest.raises(ValueError, match="only 3 blocks may be removed"):
        BlockRemovalProblem.from_hessian(H, 4, block_types=types, only_types=["mlp"])


def test_problem_properties_and_feasible():
    rng = np.random.default_rng(4)
    types = ["attention", "mlp"] * 4
    p = BlockRemovalProblem.from_hessian(psd(rng, 8), 4, keep=[3], remove=[0], block_types=types,
                                         only_types=["mlp"])
    assert p.N == 8 and p.M_free == 3 and p.energy == "fisher"
    assert p.free.tolist() == [1, 5, 7]  # mlp blocks minus the kept 3; 0 is must-remove (exempt from types)
    assert p.forbidden.tolist() == [2, 3, 4, 6]
    X = all_states(8)
    feas = p.feasible(X)
    ref = np.array([x.sum() == 4 and x[0] == 1 and x[3] == 0 and not x[[2, 4, 6]].any() for x in X])
    assert np.array_equal(feas, ref) and feas.sum() == 1  # 0 + {1, 5, 7}
    assert p.feasible(X[np.argmax(ref)]) is True
    np.testing.assert_allclose(p.energy_of(X), energies(p.Q, X))


@pytest.mark.parametrize("energy", ["fisher", "taylor"])
def test_reduced_and_expand_reproduce_full_energy(energy):
    rng = np.random.default_rng(5)
    N = 9
    H, g = psd(rng, N), rng.normal(size=N)
    p = BlockRemovalProblem.from_hessian(H, 5, g=g if energy == "taylor" else None, energy=energy, keep=[2, 7],
                                         remove=[0, 4])
    Qf, cf, F, m = p.reduced()
    assert F.tolist() == [1, 3, 5, 6, 8] and m == 3
    Xf = all_states(len(F))
    full = p.expand(Xf)
    assert (full[:, [0, 4]] == 1).all() and (full[:, [2, 7]] == 0).all()
    np.testing.assert_allclose(energies(Qf, Xf, cf), p.energy_of(full), rtol=1e-12, atol=1e-12)
    assert np.array_equal(p.feasible(full), Xf.sum(1) == m)


# ---------------------------------------------------------------------------------------------------------- Ising

@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_ising_reproduces_qubo_on_all_states(n):
    rng = np.random.default_rng(10 + n)
    N = n + 2
    p = BlockRemovalProblem(Q=sym(rng, N), M=min(n, N - 1), const=0.7, remove=[0], keep=[1])
    Qf, cf, F, m = p.reduced()
    ising = p.to_ising()
    X = all_states(n)
    S = 2 * X.astype(float) - 1
    h, J = ising.h, ising.J
    assert np.all(np.tril(J) == 0)
    E_spin = S @ h + np.einsum("ni,ij,nj->n", S, J, S) + ising.offset
    np.testing.assert_allclose(E_spin, energies(Qf, X, cf), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ising.energy(S), E_spin, rtol=1e-14, atol=1e-14)
    feas = X.sum(1) == m
    assert np.all(S[feas].sum(1) == ising.magnetization)
    h2, J2, off2, mag2 = ising
    assert off2 == ising.offset and mag2 == 2 * m - n and len(h2) == n == len(F)


# ---------------------------------------------------------------------------------------------------------- penalty

def _instances():
    rng = np.random.default_rng(20)
    out = []
    for n in (3, 6, 9, 12):
        for M in sorted({1, n // 2, n - 1}):
            out.append(("psd", BlockRemovalProblem.from_hessian(psd(rng, n, m=max(2, n // 2)), M)))
            out.append(("taylor", BlockRemovalProblem.from_hessian(psd(rng, n), M, g=3 * rng.normal(size=n),
                                                                   energy="taylor")))
            out.append(("indefinite", BlockRemovalProblem(Q=5 * sym(rng, n), M=M, const=-1.0)))
    out.append(("restricted", BlockRemovalProblem(Q=sym(rng, 12), M=5, keep=(2,), remove=(0, 11))))
    return out


@pytest.mark.parametrize("kind,p", _instances(), ids=lambda v: v if isinstance(v, str) else f"n{v.N}M{v.M}")
def test_penalty_minima_are_feasible(kind, p):
    Qf, cf, F, m = p.reduced()
    Qp, off, lam = p.penalty_qubo()
    assert lam == p.penalty_lambda() > 0
    n = len(F)
    X = all_states(n)
    E = energies(Qp, X, off)
    feas = X.sum(1) == m
    # on feasible states the penalty vanishes
    np.testing.assert_allclose(E[feas], energies(Qf, X[feas], cf), rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(E, energies(Qf, X, cf) + lam * (X.sum(1) - m) ** 2, rtol=1e-12, atol=1e-9)
    # the global minimum is feasible and equals the constrained minimum
    assert feas[np.argmin(E)]
    assert math.isclose(E.min(), E[feas].min(), rel_tol=1e-12, abs_tol=1e-12)
    # every single-flip local minimum is feasible: index of each state's neighbours via XOR of the bit codes
    codes = X @ (1 << np.arange(n)[::-1])
    pos = np.empty_like(codes)
    pos[codes] = np.arange(len(codes))
    neigh = E[pos[codes[:, None] ^ (1 << np.arange(n))[None, :]]]
    local_min = (neigh >= E[:, None]).all(axis=1)
    assert feas[local_min].all()


def test_penalty_lambda_is_tight_enough_to_matter():
    # a too-small penalty does give an infeasible minimum here, so the bound is doing real work
    Q = -np.ones((4, 4))
    p = BlockRemovalProblem(Q=Q, M=1)
    X = all_states(4)
    Qp, off, _ = p.penalty_qubo(lam=0.1)
    assert X[np.argmin(energies(Qp, X, off))].sum() != 1
    Qp, off, _ = p.penalty_qubo()
    assert X[np.argmin(energies(Qp, X, off))].sum() == 1


# ---------------------------------------------------------------------------------------------------------- dimod

def test_bqm_and_cqm_energies_match():
    rng = np.random.default_rng(30)
    N = 8
    p = BlockRemovalProblem.from_hessian(psd(rng, N), 4, g=rng.normal(size=N), energy="taylor", keep=[1],
                                         remove=[6])
    Qf, cf, F, m = p.reduced()
    X = all_states(len(F))
    full = p.expand(X)
    labels = [int(v) for v in F]
    bqm = p.to_bqm(penalty=False)
    assert bqm.vartype is dimod.BINARY and sorted(bqm.variables) == labels
    np.testing.assert_allclose(bqm.energies((X, labels)), p.energy_of(full), rtol=1e-12, atol=1e-12)
    bqm_p = p.to_bqm(penalty=True)
    lam = p.penalty_lambda()
    np.testing.assert_allclose(bqm_p.energies((X, labels)), p.energy_of(full) + lam * (X.sum(1) - m) ** 2,
                               rtol=1e-12, atol=1e-10)
    cqm = p.to_cqm()
    assert CONSTRAINT_LABEL in cqm.constraints
    np.testing.assert_allclose(cqm.objective.energies((X, labels)), p.energy_of(full), rtol=1e-12, atol=1e-12)
    sat = np.array([cqm.check_feasible(dict(zip(labels, x.tolist(), strict=True))) for x in X])
    assert np.array_equal(sat, X.sum(1) == m)


def test_exact_cqm_solver_finds_our_constrained_ground_state():
    rng = np.random.default_rng(31)
    N, M = 9, 3
    p = BlockRemovalProblem.from_hessian(psd(rng, N), M, keep=[4])
    ss = dimod.ExactCQMSolver().sample_cqm(p.to_cqm()).filter(lambda d: d.is_feasible)
    best = ss.first
    chosen = sorted(v for v, x in best.sample.items() if x == 1)
    ref = min(itertools.combinations([i for i in range(N) if i != 4], M),
              key=lambda s: p.energy_of(p.sets_to_states([s]))[0])
    assert chosen == list(ref)
    assert math.isclose(best.energy, p.energy_of(p.sets_to_states([ref]))[0], rel_tol=1e-12)
