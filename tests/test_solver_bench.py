"""Solver benchmark (cbo_utils.solvers.bench) and its instances (cbo_utils.solvers.instances)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cbo_utils.gradients import GradientResult
from cbo_utils.problem.ising import BlockRemovalProblem
from cbo_utils.solvers import bench as solver_bench
from cbo_utils.solvers.bench import CSV_NAME, MD_NAME, main, read_benchmark, run_benchmark
from cbo_utils.solvers.exact import brute_force_lowest
from cbo_utils.solvers.instances import (
    Instance,
    fisher_matrix,
    gradients_instance,
    synthetic_gradients,
    synthetic_instance,
    zenodo_instances,
)

# small budgets: every run below takes well under a second after the imports
FAST = dict(k=10, sa_reads=40, sa_sweeps=100, tabu_reads=2, tabu_timeout_ms=10, use_bound=False, progress=False,
            warmup=False)


def _mean_offdiag(C: np.ndarray, idx: np.ndarray) -> float:
    S = C[np.ix_(idx, idx)]
    return float(S[np.triu_indices(len(idx), 1)].mean())


@pytest.fixture(scope="module")
def small():
    """N = 13, M = 4 synthetic instance and one benchmark run on it (exact + sa + tabu, two seeds)."""
    return synthetic_instance(13, seed=3)


@pytest.fixture(scope="module")
def small_run(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    df = run_benchmark([small], [4], seeds=(0, 1), out_dir=out, **FAST)
    return df, out


# ---------------------------------------------------------------------------------------------------- instances

def test_synthetic_gradients_deterministic():
    A = synthetic_gradients(20, samples=256, seed=5)
    assert A.shape == (256, 20) and A.dtype == np.float64
    np.testing.assert_array_equal(A, synthetic_gradients(20, samples=256, seed=5))
    assert not np.array_equal(A, synthetic_gradients(20, samples=256, seed=6))
    a, b = synthetic_instance(20, seed=5), synthetic_instance(20, seed=5)
    assert a.sha256 == b.sha256 and a.name == "synthetic-N20-seed5" and a.N == 20
    np.testing.assert_allclose(a.H, fisher_matrix(synthetic_gradients(20, seed=5)), rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_structure(seed):
    N = 40
    A = synthetic_gradients(N, seed=seed)
    H = fisher_matrix(A)
    d = np.diag(H)
    # the documented dominant blocks (0, 1, N-1) have the three largest diagonal entries
    assert set(np.argsort(d)[::-1][:3].tolist()) == {0, 1, N - 1}
    assert d.max() / d.min() > 1e3  # scales over orders of magnitude
    ordinary = np.array([i for i in range(N) if i not in (0, 1, N - 1)])
    scale = np.sqrt(d)
    assert np.median(scale[ordinary[ordinary >= N // 2]]) < 0.5 * np.median(scale[ordinary[ordinary < N // 2]])
    # late blocks (last third) share factors; early ones do not
    C = np.corrcoef(A.T)
    n_late = int(np.ceil(N / 3))
    late, early = np.arange(N - n_late, N), np.arange(N - n_late)
    assert _mean_offdiag(C, late) > 0.15
    assert abs(_mean_offdiag(C, early)) < 0.03
    # heavy-ish tails: a Gaussian has excess kurtosis 0
    z = (A[:, early] - A[:, early].mean(0)) / A[:, early].std(0)
    assert np.median((z ** 4).mean(0) - 3.0) > 1.0


def test_synthetic_validation():
    with pytest.raises(ValueError, match="N >= 4"):
        synthetic_gradients(3)
    with pytest.raises(ValueError, match="samples"):
        synthetic_gradients(10, samples=5)


def test_instance_validation():
    with pytest.raises(ValueError, match="name"):
        Instance("a b/c", np.eye(3))
    with pytest.raises(ValueError, match="square"):
        Instance("x", np.ones((2, 3)))


def test_gradients_instance(tmp_path):
    A = torch.as_tensor(synthetic_gradients(8, samples=64, seed=1))
    folder = tmp_path / "tinymodel"
    GradientResult.from_A(A).save(folder, {"parameters": {"model": "tinymodel"}})
    inst = gradients_instance(folder / "gradients.safetensors")
    assert inst.name == "tinymodel" and inst.N == 8 and inst.source == "gradients"
    np.testing.assert_allclose(inst.H, fisher_matrix(A.numpy()), rtol=1e-13, atol=0)
    assert inst.params["samples"] == 64 and len(inst.params["file_sha256"]) == 64


def test_zenodo_dict_and_tensor(tmp_path):
    A1 = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    A2 = torch.randn(50, 9, generator=torch.Generator().manual_seed(1))
    torch.save({"grads": A1, "g": A1.mean(0), "note": "extra entries are fine"}, tmp_path / "llama-8b.pt")
    torch.save(A2.to(torch.float32), tmp_path / "qwen3-14b.pt")
    (tmp_path / "README.txt").write_text("not a tensor")
    insts = zenodo_instances(tmp_path)
    assert [i.name for i in insts] == ["llama-8b", "qwen3-14b"]
    assert [i.N for i in insts] == [6, 9] and {i.source for i in insts} == {"zenodo"}
    A1d = A1.double().numpy()
    np.testing.assert_allclose(insts[0].H, A1d.T @ A1d / 64, rtol=1e-12, atol=1e-15)
    assert insts[1].H.dtype == np.float64 and insts[1].params["samples"] == 50


@pytest.mark.parametrize("content, match", [
    (torch.randn(30), "2-D"),
    ({"a": torch.randn(40, 5), "b": torch.randn(40, 5)}, "exactly one 2-D tensor"),
    ({"g": torch.randn(5)}, "exactly one 2-D tensor"),
    (torch.randn(5, 40), "transpose"),
    (torch.full((40, 5), float("nan")), "non-finite"),
    (torch.randint(0, 3, (40, 5)), "floating point"),
])
def test_zenodo_malformed(tmp_path, content, match):
    torch.save(content, tmp_path / "bad_file.pt")
    with pytest.raises(ValueError, match=match) as err:
        zenodo_instances(tmp_path)
    assert "bad_file.pt" in str(err.value)


def test_zenodo_unreadable_and_empty(tmp_path):
    with pytest.raises(ValueError, match="no \\*.pt files"):
        zenodo_instances(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="junk.pt.*weights_only"):
        zenodo_instances(tmp_path)
    with pytest.raises(FileNotFoundError):
        zenodo_instances(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------- benchmark

def test_exact_row_is_the_brute_force_optimum(small, small_run):
    df, _ = small_run
    exact = df[df["solver"] == "exact"]
    assert len(exact) == 1
    bf = brute_force_lowest(BlockRemovalProblem.from_hessian(small.H, 4), k=10)
    assert exact["energy"].iloc[0] == pytest.approx(float(bf["energy"].iloc[0]), rel=1e-12, abs=0)
    assert exact["best_blocks"].iloc[0] == bf["removed_blocks"].iloc[0]
    assert bool(exact["proven_optimal"].iloc[0]) and int(exact["n_in_topk"].iloc[0]) == 10


def test_gaps_are_relative_to_exact(small_run):
    df, _ = small_run
    assert sorted(df["solver"].unique()) == ["exact", "sa", "tabu"]
    assert len(df) == 1 + 2 * 2  # exact once, sa and tabu per seed
    E_exact = float(df.loc[df["solver"] == "exact", "energy"].iloc[0])
    assert (df["reference"] == "exact").all()
    assert (df["gap"] >= 0).all()
    assert (df.groupby("best_blocks")["energy"].nunique() == 1).all()  # one state, one energy, whatever the solver
    np.testing.assert_array_equal(df["gap"].to_numpy(float), df["energy"].to_numpy(float) - E_exact)
    np.testing.assert_allclose(df["rel_gap"].to_numpy(float), df["gap"].to_numpy(float) / abs(E_exact))
    proven = df["proven_optimal"].astype(bool).to_numpy()
    np.testing.assert_array_equal(proven, df["gap"].to_numpy(float) <= 1e-8 * df["energy"].to_numpy(float))
    assert (df["n_in_topk"] <= df["n_distinct"]).all() and (df["n_distinct"] <= 10).all()
    assert df["time_s"].gt(0).all() and df["bound"].isna().all()


def test_gap_and_topk_of_a_suboptimal_solver(tmp_path, monkeypatch, small):
    real = solver_bench.solve

    def worse(problem, solver="exact", **kw):
        if solver != "sa":
            return real(problem, solver=solver, **kw)
        ranked = real(problem, solver="exact", k=15, progress=False)
        return ranked.iloc[3:].reset_index(drop=True)  # misses the 3 best states; 12 states, 7 of exact's 10 best

    monkeypatch.setattr(solver_bench, "solve", worse)
    df = run_benchmark([small], [4], solvers=("exact", "sa"), out_dir=tmp_path, **FAST)
    ranked = real(BlockRemovalProblem.from_hessian(small.H, 4), solver="exact", k=15, progress=False)
    E = ranked["energy"].to_numpy(float)
    sa = df[df["solver"] == "sa"].iloc[0]
    assert sa["energy"] == pytest.approx(E[3], rel=1e-14) and sa["best_blocks"] == ranked["removed_blocks"].iloc[3]
    assert sa["gap"] == pytest.approx(E[3] - E[0], rel=1e-9) and sa["gap"] > 0
    assert sa["rel_gap"] == pytest.approx((E[3] - E[0]) / E[0], rel=1e-9)
    assert int(sa["n_in_topk"]) == 7 and int(sa["n_distinct"]) == 12 and not sa["proven_optimal"]


def test_csv_roundtrip_and_markdown_one_line_per_row(small_run):
    df, out = small_run
    back = read_benchmark(out / CSV_NAME)
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    md = (out / MD_NAME).read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    body = table[2:]
    assert table[1].startswith("|---") and len(body) == len(df)
    for line, (_, r) in zip(body, df.iterrows()):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["instance"] and cells[3] == r["solver"]
    for name in (CSV_NAME, MD_NAME):
        side = json.loads((out / f"{name}.json").read_text())
        assert side["kind"] == "solver_benchmark" and side["parameters"]["seeds"] == [0, 1]
        assert side["instances"][0]["H_sha256"] == df["instance_sha256"].iloc[0]
    assert all((out / f).is_file() for f in df["states_file"])


def test_resume_measures_nothing_and_keeps_the_csv(tmp_path):
    inst = synthetic_instance(12, seed=1)
    first = run_benchmark([inst], [4], out_dir=tmp_path, **FAST)
    assert first.attrs["n_measured"] == 3
    csv, md = (tmp_path / CSV_NAME).read_bytes(), (tmp_path / MD_NAME).read_bytes()
    second = run_benchmark([inst], [4], out_dir=tmp_path, **FAST)
    assert second.attrs["n_measured"] == 0 and second.attrs["n_resumed"] == 3
    assert (tmp_path / CSV_NAME).read_bytes() == csv and (tmp_path / MD_NAME).read_bytes() == md
    # drop one row: exactly that measurement is redone
    lines = csv.decode().splitlines(keepends=True)
    keep = [ln for ln in lines if ",tabu," not in ln]
    assert len(keep) == len(lines) - 1
    (tmp_path / CSV_NAME).write_text("".join(keep))
    third = run_benchmark([inst], [4], out_dir=tmp_path, **FAST)
    assert third.attrs["n_measured"] == 1 and len(third) == 3


def test_each_measurement_is_written_at_once(tmp_path, monkeypatch):
    real = solver_bench.solve

    def failing(problem, solver="exact", **kw):
        if solver == "tabu":
            raise KeyboardInterrupt  # an interruption during the third measurement
        return real(problem, solver=solver, **kw)

    monkeypatch.setattr(solver_bench, "solve", failing)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark([synthetic_instance(12, seed=2)], [3], out_dir=tmp_path, **FAST)
    df = read_benchmark(tmp_path)
    assert sorted(df["solver"]) == ["exact", "sa"]


def test_resume_refuses_other_matrix_or_settings(tmp_path):
    run_benchmark([synthetic_instance(12, seed=1)], [3], solvers=("sa",), out_dir=tmp_path, **FAST)
    other = Instance("synthetic-N12-seed1", synthetic_instance(12, seed=2).H, "synthetic")
    with pytest.raises(ValueError, match="different matrix"):
        run_benchmark([other], [3], solvers=("sa",), out_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match="settings"):
        run_benchmark([synthetic_instance(12, seed=1)], [3], solvers=("sa",), out_dir=tmp_path,
                      **{**FAST, "sa_sweeps": 7})


def test_without_exact_the_reference_is_the_best_found(tmp_path, small):
    df = run_benchmark([small], [4], exact_state_limit=10, out_dir=tmp_path, **FAST)
    assert "exact" not in set(df["solver"]) and (df["reference"] == "best_found").all()
    assert df["gap"].min() == 0 and (df["gap"] >= 0).all()
    assert df["reference_energy"].eq(df["energy"].min()).all()
    assert df["n_in_topk"].notna().all() and (df["n_in_topk"] >= 1).sum() >= 1
    assert not df["proven_optimal"].any()  # nothing proves optimality without exact or a bound


def _fake_bounds(monkeypatch, value: float) -> list:
    calls = []

    def lower_bound(problem, time_limit=None):
        calls.append(time_limit)
        return {"bound": value, "method": "fake", "array": np.zeros(3)}

    import cbo_utils.problem.bounds

    monkeypatch.setattr(cbo_utils.problem.bounds, "lower_bound", lower_bound)
    return calls


def test_bound_rows_and_certified_gaps(tmp_path, monkeypatch, small):
    opt = float(brute_force_lowest(BlockRemovalProblem.from_hessian(small.H, 4), k=1)["energy"].iloc[0])
    calls = _fake_bounds(monkeypatch, opt)
    df = run_benchmark([small], [4], exact_state_limit=10, time_limit=2.5, out_dir=tmp_path,
                       **{**FAST, "use_bound": True})
    assert calls == [2.5] and df.attrs["bound"] == "cbo_utils.problem.bounds.lower_bound"
    b = df[df["solver"] == "bound"]
    assert len(b) == 1 and b["energy"].iloc[0] == opt and json.loads(b["details"].iloc[0])["method"] == "fake"
    sol = df[df["solver"] != "bound"]
    np.testing.assert_array_equal(sol["certified_gap"].to_numpy(float), sol["energy"].to_numpy(float) - opt)
    at_opt = sol["energy"].to_numpy(float) <= opt * (1 + 1e-12)
    np.testing.assert_array_equal(sol["proven_optimal"].astype(bool).to_numpy(), at_opt)
    assert at_opt.any()


def test_invalid_bound_is_refused(tmp_path, monkeypatch, small):
    _fake_bounds(monkeypatch, 1e6)
    with pytest.raises(ValueError, match="not a valid bound"):
        run_benchmark([small], [4], solvers=("sa",), out_dir=tmp_path, **{**FAST, "use_bound": True})


def test_cli(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["--N", "12", "--M", "3", "--out", str(out), "--solvers", "exact", "sa", "--k", "5", "--sa-reads",
               "20", "--sa-sweeps", "50", "--no-bound"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "synthetic-N12-seed0 M=3 exact" in text and "synthetic-N12-seed0 M=3 sa seed=0" in text
    assert len(read_benchmark(out)) == 2 and (out / MD_NAME).is_file()
    assert main(["--N", "12", "--M", "12", "--out", str(out), "--quiet", "--no-bound"]) == 2
    assert "1 <= M < N" in capsys.readouterr().err
