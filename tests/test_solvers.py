"""Solvers against an independent brute force: exact enumeration for every M, chunking, restrictions; simulated
annealing and tabu on realistic instances; the result table and its CSV round trip."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from cbo_utils.core.artifacts import format_blocks, parse_blocks, provenance, read_json, sidecar_path
from cbo_utils.problem.ising import BlockRemovalProblem
from cbo_utils.solvers import exact as solvers
from cbo_utils.solvers.exact import brute_force_lowest, combinations_colex, exact_lowest, naive_exact_lowest
from cbo_utils.solvers.heuristics import polish_states, repair_states, simulated_annealing, solve, tabu
from cbo_utils.solvers.states import COLUMNS, read_states_csv, states_blocks, states_to_matrix, write_states_csv


def psd(rng, N, m=None):
    """Random PSD ``AᵀA/m`` with correlated columns (strong off-diagonal couplings)."""
    m = m or 2 * N
    A = rng.normal(size=(m, N)) + rng.normal(size=(m, 1)) * rng.uniform(-1.5, 1.5, size=N)
    return A.T @ A / m


def realistic(seed, N, m=160):
    """Shaped like a real block Fisher matrix: a few dominant columns, correlated late blocks."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(m, N))
    A[:, rng.choice(N, 3, replace=False)] *= 4.0
    A[:, -N // 3:] += 1.5 * rng.normal(size=(m, 1))
    return A.T @ A / m


def reference_lowest(problem: BlockRemovalProblem):
    """Independent brute force: every M-subset of all N blocks, feasibility checked by hand, energy summed over the
    subset's submatrix. Returns sorted (energy, "i j k") pairs."""
    Q, N, M = problem.Q, problem.N, problem.M
    types = problem.only_types
    sets = []
    for s in itertools.combinations(range(N), M):
        if any(b in problem.keep for b in s) or not set(problem.remove) <= set(s):
            continue
        if types is not None and any(problem.block_types[b] not in types for b in s if b not in problem.remove):
            continue
        sets.append(s)
    S = np.array(sets, dtype=np.int64).reshape(len(sets), M)
    E = Q[S[:, :, None], S[:, None, :]].sum(axis=(1, 2)) + problem.const
    return sorted(zip(E.tolist(), [format_blocks(s) for s in sets], strict=True))


def assert_matches_reference(df, ref, k):
    n = min(k, len(ref))
    assert len(df) == n
    assert list(df["rank"]) == list(range(n))
    np.testing.assert_allclose(df["energy"].to_numpy(), [e for e, _ in ref[:n]], rtol=1e-11, atol=1e-11)
    assert df["energy"].is_monotonic_increasing and df["feasible"].all()
    for (e, s), got, tie in zip(ref[:n], df["removed_blocks"], df["tie"], strict=True):
        if s != got:  # sets may differ only within ties
            assert tie, (s, got)
            assert any(r == got and math.isclose(x, e, rel_tol=1e-9, abs_tol=1e-9) for x, r in ref)


# ---------------------------------------------------------------------------------------------------------- exact

def test_combinations_colex_cover_everything_once():
    for n, r in [(7, 0), (7, 1), (7, 3), (9, 9), (12, 5)]:
        C = combinations_colex(n, r)
        assert C.shape == (math.comb(n, r), r)
        assert {tuple(c) for c in C} == set(itertools.combinations(range(n), r))
        assert np.array_equal(combinations_colex(n, r, 3, 8), C[3:8])


@pytest.mark.parametrize("margin", [0, 16])
@pytest.mark.parametrize("N", [2, 5, 9, 12, 16])
def test_exact_every_M_matches_brute_force(N, margin, monkeypatch):
    monkeypatch.setattr(solvers, "MARGIN", margin)  # 0: the enumeration's own ranking must already be right
    rng = np.random.default_rng(N)
    H = psd(rng, N)
    for M in range(1, N):
        p = BlockRemovalProblem.from_hessian(H, M)
        ref = reference_lowest(p)
        for k in (1, 7, 40, math.comb(N, M) + 5):
            df = exact_lowest(p, k=k, progress=False)
            assert_matches_reference(df, ref, k)
        assert df.attrs["solver_info"]["n_states"] == math.comb(N, M)
        assert len(df) == math.comb(N, M)  # k > C(N, M) returns every state


def test_exact_matches_2_to_the_N_brute_force_and_naive():
    rng = np.random.default_rng(7)
    H = psd(rng, 14)
    for M in (1, 4, 7, 11, 13):
        p = BlockRemovalProblem.from_hessian(H, M, g=rng.normal(size=14), energy="taylor")
        a = exact_lowest(p, k=30, progress=False)
        b = brute_force_lowest(p, k=30)
        c = naive_exact_lowest(p, k=30)
        for other in (b, c):
            np.testing.assert_allclose(a["energy"], other["energy"], rtol=1e-12, atol=1e-12)
            same = (a["removed_blocks"] == other["removed_blocks"]) | a["tie"]
            assert same.all()


@pytest.mark.parametrize("chunk_elems", [1, 3, 17, 64])
def test_exact_with_tiny_chunks(chunk_elems, monkeypatch):
    monkeypatch.setattr(solvers, "MARGIN", 0)
    rng = np.random.default_rng(100 + chunk_elems)
    N = 11
    H = psd(rng, N)
    for M in (1, 3, 5, 8, 10):
        p = BlockRemovalProblem.from_hessian(H, M)
        ref = reference_lowest(p)
        for k in (1, 12, 500):
            assert_matches_reference(exact_lowest(p, k=k, chunk_elems=chunk_elems, progress=False), ref, k)


def test_exact_with_restrictions():
    rng = np.random.default_rng(8)
    N = 13
    types = ["attention", "mlp", "mlp", "moe"] * 3 + ["mamba"]
    H = psd(rng, N)
    cases = [
        dict(keep=(0, 5)), dict(remove=(3,)), dict(keep=(1, 2), remove=(12, 4)),
        dict(block_types=types, only_types=("mlp",)),
        dict(block_types=types, only_types=("mlp", "mamba"), remove=(0,), keep=(2,)),
    ]
    for case in cases:
        for M in (1, 2, 4, 6):
            try:
                p = BlockRemovalProblem.from_hessian(H, M, **case)
            except ValueError:
                continue  # e.g. more must-remove blocks than M
            ref = reference_lowest(p)
            for chunk in (5, 2 ** 22):
                df = exact_lowest(p, k=25, chunk_elems=chunk, progress=False)
                assert_matches_reference(df, ref, 25)
                X = states_to_matrix(df, N)
                assert not X[:, p.forbidden].any()
                assert X[:, list(p.remove)].all()
                assert (X.sum(1) == M).all()


def test_exact_trivial_and_degenerate_cases():
    rng = np.random.default_rng(9)
    H = psd(rng, 6)
    # M_free == 0: the single state is the must-remove set
    p = BlockRemovalProblem.from_hessian(H, 2, remove=(1, 4))
    df = exact_lowest(p, k=5, progress=False)
    assert list(df["removed_blocks"]) == ["1 4"]
    # M_free == n_free
    p = BlockRemovalProblem.from_hessian(H, 3, keep=(0, 1, 2))
    assert list(exact_lowest(p, k=5, progress=False)["removed_blocks"]) == ["3 4 5"]
    # all energies equal: every state ties, order is by string
    p = BlockRemovalProblem(Q=np.zeros((7, 7)), M=3)
    df = exact_lowest(p, k=100, progress=False)
    assert len(df) == 35 and df["tie"].all() and list(df["removed_blocks"]) == sorted(df["removed_blocks"])


def test_exact_covers_every_state_at_real_sizes():
    """C(32, 8) states all visited (the speed goal itself lives in benchmarks/bench_enumeration.py)."""
    p = BlockRemovalProblem.from_hessian(realistic(0, 32), 8)
    df = exact_lowest(p, k=20, progress=False)
    info = df.attrs["solver_info"]
    assert info["n_states"] == math.comb(32, 8)
    assert df["energy"].is_monotonic_increasing and len(df) == 20
    ref = naive_exact_lowest(BlockRemovalProblem.from_hessian(realistic(0, 24), 8), k=20)  # 735,471 states
    got = exact_lowest(BlockRemovalProblem.from_hessian(realistic(0, 24), 8), k=20, progress=False)
    assert list(got["removed_blocks"][~got["tie"]]) == list(ref["removed_blocks"][~ref["tie"]])
    np.testing.assert_allclose(got["energy"], ref["energy"], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------- samplers

def test_repair_and_polish():
    rng = np.random.default_rng(11)
    n, m = 10, 4
    Q = psd(rng, n)
    X = rng.integers(0, 2, size=(200, n))
    R, bad = repair_states(Q, m, X)
    assert (R.sum(1) == m).all()
    assert np.array_equal(bad, X.sum(1) != m)
    assert np.array_equal(R[~bad], X[~bad])
    P, improved, moves = polish_states(Q, R)
    assert (P.sum(1) == m).all() and moves >= improved.sum()
    E = np.einsum("ni,ij,nj->n", P, Q, P)
    E0 = np.einsum("ni,ij,nj->n", R, Q, R)
    assert (E <= E0 + 1e-12).all()
    # no swap improves a polished state
    for x, e in zip(P[:20], E[:20], strict=True):
        for i in np.flatnonzero(x):
            for j in np.flatnonzero(x == 0):
                y = x.copy()
                y[i], y[j] = 0, 1
                assert y @ Q @ y >= e - 1e-12


@pytest.mark.parametrize("seed,N,M", [(1, 24, 6), (2, 28, 8), (3, 32, 8)])
def test_sa_and_tabu_find_the_ground_state(seed, N, M):
    p = BlockRemovalProblem.from_hessian(realistic(seed, N), M)
    ex = exact_lowest(p, k=5, progress=False)
    sa = simulated_annealing(p, k=5, num_reads=64, num_sweeps=200, seed=seed)
    tb = tabu(p, k=5, num_reads=8, timeout_ms=None, num_restarts=2, seed=seed)
    for df, name in ((sa, "sa"), (tb, "tabu")):
        assert df["feasible"].all() and (df["solver"] == name).all() and (df["seed"] == seed).all()
        assert df["removed_blocks"].iloc[0] == ex["removed_blocks"].iloc[0]
        assert math.isclose(df["energy"].iloc[0], ex["energy"].iloc[0], rel_tol=1e-12)
        info = df.attrs["solver_info"]
        assert info["n_repaired"] == info["n_infeasible"] <= info["n_samples"]
        assert 1 <= len(df) <= info["n_distinct"]
        assert (states_to_matrix(df, N).sum(1) == M).all()
    # deterministic for a fixed seed
    sa2 = simulated_annealing(p, k=5, num_reads=64, num_sweeps=200, seed=seed)
    tb2 = tabu(p, k=5, num_reads=8, timeout_ms=None, num_restarts=2, seed=seed)
    pd.testing.assert_frame_equal(sa, sa2)
    pd.testing.assert_frame_equal(tb, tb2)


def test_sa_counts_repairs_when_penalty_is_too_weak():
    p = BlockRemovalProblem.from_hessian(realistic(5, 20), 5)
    df = simulated_annealing(p, k=10, num_reads=50, num_sweeps=50, seed=0, lam=1e-6, polish=False)
    info = df.attrs["solver_info"]
    assert info["n_infeasible"] > 0 and info["n_repaired"] == info["n_infeasible"]
    assert df["feasible"].all() and (states_to_matrix(df, 20).sum(1) == 5).all()


def test_samplers_respect_restrictions():
    N = 24
    types = ["attention", "mlp"] * (N // 2)
    p = BlockRemovalProblem.from_hessian(realistic(6, N), 7, keep=(1, 3), remove=(0, 22), block_types=types,
                                         only_types=("mlp",))
    ex = exact_lowest(p, k=3, progress=False)
    for df in (simulated_annealing(p, k=10, num_reads=32, num_sweeps=100, seed=1, lam=1e-3),
               tabu(p, k=10, num_reads=4, timeout_ms=None, num_restarts=1, seed=1)):
        X = states_to_matrix(df, N)
        assert not X[:, p.forbidden].any() and X[:, [0, 22]].all() and (X.sum(1) == 7).all()
        assert df["feasible"].all()
        assert df["removed_blocks"].iloc[0] == ex["removed_blocks"].iloc[0]


def test_samplers_trivial_problem():
    p = BlockRemovalProblem.from_hessian(psd(np.random.default_rng(0), 5), 2, remove=(0, 3))
    for solver in ("sa", "tabu"):
        df = solve(p, solver, k=3, seed=4)
        assert list(df["removed_blocks"]) == ["0 3"] and df["feasible"].all()


# ---------------------------------------------------------------------------------------------------------- API

def test_solve_dispatch_and_errors():
    p = BlockRemovalProblem.from_hessian(psd(np.random.default_rng(1), 8), 3)
    a = solve(p, "exact", k=4, progress=False)
    b = solve(p, "sa", k=4, seed=2, num_reads=20, num_sweeps=100)
    assert list(a.columns) == COLUMNS and list(b.columns) == COLUMNS
    assert a["seed"].isna().all() and (b["seed"] == 2).all()
    assert a["removed_blocks"].iloc[0] == b["removed_blocks"].iloc[0]
    with pytest.raises(ValueError, match=r"unknown solver 'qaoa'.*exact.*sa.*tabu"):
        solve(p, "qaoa")
    with pytest.raises(ValueError, match="positive integer"):
        exact_lowest(p, k=0)


def test_csv_round_trip(tmp_path):
    p = BlockRemovalProblem.from_hessian(psd(np.random.default_rng(2), 10), 4, remove=(9,))
    df = exact_lowest(p, k=12, progress=False)
    path = tmp_path / "states.csv"
    write_states_csv(df, path, provenance("states", {"M": 4}))
    back = read_states_csv(path)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back["energy"].dtype == np.float64 and back["feasible"].dtype == bool and back["tie"].dtype == bool
    assert np.array_equal(back["energy"].to_numpy(), df["energy"].to_numpy())  # %.17g: bit-exact
    assert states_blocks(back) == [parse_blocks(s) for s in df["removed_blocks"]]
    assert all(9 in blocks for blocks in states_blocks(back))
    side = read_json(sidecar_path(path))
    assert side["kind"] == "states" and side["solver_info"]["n_states"] == math.comb(9, 3)
    assert back.attrs["solver_info"]["solver"] == "exact"
    sa = simulated_annealing(p, k=5, num_reads=10, num_sweeps=50, seed=3)
    write_states_csv(sa, tmp_path / "sa.csv")
    back = read_states_csv(tmp_path / "sa.csv")
    assert (back["seed"] == 3).all() and str(back["seed"].dtype) == "Int64"
    assert not sidecar_path(tmp_path / "sa.csv").exists()
    mat = states_to_matrix(back, 10)
    assert mat.dtype == np.int8 and mat.shape == (len(back), 10) and (mat.sum(1) == 4).all()


def test_auto_solver_enumerates_when_affordable_and_falls_back_to_tabu(monkeypatch):
    """solver="auto": exact enumeration below EXACT_LIMIT feasible states (same table as "exact"), tabu above."""
    import numpy as np

    from cbo_utils.problem.ising import BlockRemovalProblem
    from cbo_utils.solvers import heuristics

    rng = np.random.default_rng(3)
    A = rng.normal(size=(40, 10))
    prob = BlockRemovalProblem.from_hessian(A.T @ A / 40, 3)
    auto, exact = heuristics.solve(prob, "auto", k=5), heuristics.solve(prob, "exact", k=5, progress=False)
    assert list(auto["removed_blocks"]) == list(exact["removed_blocks"])
    assert "n_states" in auto.attrs["solver_info"]                    # the enumeration's record
    monkeypatch.setattr(heuristics, "EXACT_LIMIT", 10)                # C(10, 3) = 120 > 10: tabu
    called = {}
    real_tabu = heuristics.tabu
    monkeypatch.setattr(heuristics, "tabu", lambda p, **kw: called.setdefault("tabu", real_tabu(p, **kw)))
    tab = heuristics.solve(prob, "auto", k=5, progress=False)
    assert "tabu" in called and tab["energy"].iloc[0] == pytest.approx(exact["energy"].iloc[0])
