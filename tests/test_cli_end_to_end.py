"""The tiny profile end to end through the command line: calibration → A, g, H → states → pruned → verified."""

import json

import pandas as pd
import pytest
import torch

from cbo_utils.cli import main
from cbo_utils.gradients import load_gradients


@pytest.mark.parametrize("name, M, extra", [
    ("tiny-llama", 2, []),
    ("tiny-qwen3", 2, ["--energy", "taylor", "--keep", "0,5"]),
    ("tiny-nemotron-h", 3, ["--only-types", "moe"]),
])
def test_tiny_pipeline_through_cli(name, M, extra, tmp_path, capsys):
    gdir = tmp_path / "grad"
    assert main(["gradients", "--model", name, "--out", str(gdir), "--samples", "6", "--max-tokens", "48",
                 "--exact-hessian", "1", "--quiet"]) == 0
    res = load_gradients(gdir)
    assert res.A.shape[0] == 6 and torch.isfinite(res.A).all() and res.H_exact is not None
    side = json.loads((gdir / "gradients.safetensors.json").read_text())
    assert side["parameters"]["model"] == name and side["calibration"]["sha256"]
    assert side["samples"] == 6 and "versions" in side

    states = tmp_path / "states.csv"
    assert main(["solve", "--hessian", str(gdir), "-M", str(M), "-k", "5", "--out", str(states), *extra]) == 0
    df = pd.read_csv(states)
    assert list(df["rank"]) == list(range(len(df))) and df["energy"].is_monotonic_increasing
    sets = [list(map(int, s.split())) for s in df["removed_blocks"]]
    assert all(len(s) == M for s in sets)
    if name == "tiny-qwen3":
        assert all(0 not in s and 5 not in s for s in sets)
    if name == "tiny-nemotron-h":
        types = res.meta["block_types"]
        assert all(types[b] == "moe" for s in sets for b in s)

    out = tmp_path / "pruned"
    assert main(["prune", "--model", name, "--states", str(states), "--rank", "0", "--out", str(out)]) == 0
    rec = json.loads((out / "removed_blocks.json").read_text())
    assert rec["removed_blocks"] == sets[0]
    assert json.loads((out / "verification.json").read_text())["ok"]
    assert main(["verify", str(out), "--original", name]) == 0
    assert "PASS" in capsys.readouterr().out


def _grad_dir(tmp_path, A):
    from cbo_utils.gradients import GradientResult

    GradientResult.from_A(A).save(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("args, words", [
    (["solve", "--hessian", "{g}", "-M", "6", "--out", "{o}"], "no model"),
    (["solve", "--hessian", "{missing}", "-M", "2", "--out", "{o}"], "no gradient file"),
    (["solve", "--hessian", "{g}", "-M", "2", "--keep", "9", "--out", "{o}"], "outside 0..5"),
    (["solve", "--hessian", "{g}", "-M", "2", "--hessian-kind", "exact", "--out", "{o}"], "no exact Hessian"),
    (["prune", "--model", "tiny-llama", "--remove", "0-5", "--out", "{o}"], "leaves no model"),
    (["prune", "--model", "tiny-llama", "--remove", "7", "--out", "{o}"], "out of range"),
    (["verify", "{missing}", "--original", "tiny-llama"], "removed_blocks.json"),
    (["retrain", "--teacher", "tiny-llama", "--out", "{o}"], "--student FOLDER"),
])
def test_cli_errors_are_clear_and_nonzero(args, words, tmp_path, capsys):
    g = _grad_dir(tmp_path / "g", torch.randn(8, 6, dtype=torch.float64))
    fill = {"g": g, "o": str(tmp_path / "out.csv"), "missing": str(tmp_path / "missing")}
    rc = main([a.format(**fill) for a in args])
    err = capsys.readouterr().err
    assert rc != 0 and words in err, err


def test_nan_hessian_is_refused(tmp_path, capsys):
    A = torch.randn(8, 6)
    A[2, 3] = float("nan")
    torch.save(A, tmp_path / "a.pt")
    assert main(["solve", "--hessian", str(tmp_path / "a.pt"), "-M", "2", "--out", str(tmp_path / "s.csv")]) != 0
    assert "non-finite" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["blocks", "gradients", "solve", "prune", "verify", "retrain", "baseline",
                                 "compare", "hybrid", "prune-files"])
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: cbo" in capsys.readouterr().out


def test_blocks_listing(capsys):
    assert main(["blocks", "--model", "tiny-nemotron-h"]) == 0
    out = capsys.readouterr().out
    assert "14 blocks" in out and "attention" in out and "moe" in out


def test_unreachable_model_is_a_clear_error(tmp_path, capsys):
    rc = main(["gradients", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-model" in err and "tiny model name" in err


def test_hopeless_exact_enumeration_is_refused(tmp_path, capsys):
    g = _grad_dir(tmp_path / "g", torch.randn(100, 80, dtype=torch.float64))
    rc = main(["solve", "--hessian", g, "-M", "30", "--out", str(tmp_path / "s.csv")])
    assert rc == 2 and "--solver tabu" in capsys.readouterr().err
    assert main(["solve", "--hessian", g, "-M", "30", "--solver", "tabu", "--reads", "2", "--timeout-ms", "50",
                 "-k", "3", "--out", str(tmp_path / "s.csv")]) == 0


def test_stochastic_gradients_and_baseline_through_cli(tmp_path, capsys):
    gdir = tmp_path / "sd"
    assert main(["gradients", "--model", "tiny-llama", "--out", str(gdir), "--samples", "4", "--max-tokens", "32",
                 "--random-removal", "1,3", "--points-per-sample", "2", "--quiet"]) == 0
    res = load_gradients(gdir)
    pts = res.meta["random_points"]
    assert res.A.shape == (8, 6) and len(pts) == 8 and all(1 <= len(p) <= 3 for p in pts)
    sel = tmp_path / "sel.csv"
    assert main(["baseline", "--model", "tiny-llama", "--method", "sleb", "-M", "2", "--samples", "4",
                 "--max-tokens", "32", "--out", str(sel)]) == 0
    row = pd.read_csv(sel).iloc[0]
    assert row["method"] == "sleb" and len(str(row["removed"]).split()) == 2
    with pytest.raises(SystemExit):  # argparse rejects a reversed range
        main(["gradients", "--model", "tiny-llama", "--out", str(gdir), "--random-removal", "3,1"])
    assert "not a range" in capsys.readouterr().err


def test_prune_then_retrain_through_cli(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["prune", "--model", "tiny-llama", "--remove", "1,4", "--out", str(tmp_path / "p")]) == 0
    rc = main(["retrain", "--teacher", "tiny-llama", "--student", str(tmp_path / "p"), "--out", str(tmp_path / "r"),
               "--samples", "400", "--max-length", "64", "--packing", "--heldout-fraction", "0.05",
               "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "3", "--warmup-steps", "1",
               "--lr", "1e-3", "--teacher-dtype", "float32"])
    out = capsys.readouterr().out
    assert rc == 0 and "retrained 3 steps" in out, out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "r").config.num_hidden_layers == 4


def test_prune_files_through_cli(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from cbo_utils.model.tiny import build_tiny

    model, tok = build_tiny("tiny-nemotron-h")
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    assert main(["prune-files", str(tmp_path / "src"), "--remove", "1,5", "--out", str(tmp_path / "p")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert back.config.num_hidden_layers == 12
    assert main(["prune-files", str(tmp_path / "src"), "--remove", "5,10", "--out", str(tmp_path / "q")]) != 0
    assert "attention" in capsys.readouterr().err   # removing every attention block is refused


def test_solve_with_a_certified_bound(tmp_path, capsys):
    """`cbo solve --bound`: a heuristic answer carries a certified gap (bound ≤ the brute-force optimum ≤ its best);
    the exact answer is its own bound."""
    import itertools

    import numpy as np

    from cbo_utils.core.artifacts import read_json

    A = torch.randn(64, 14, dtype=torch.float64) * torch.linspace(2.0, 0.2, 14, dtype=torch.float64)
    g = _grad_dir(tmp_path / "g", A)
    H = (A.T @ A / A.shape[0]).numpy()
    best = min(H[np.ix_(c, c)].sum() for c in map(list, itertools.combinations(range(14), 5)))
    out = tmp_path / "tabu.csv"
    assert main(["solve", "--hessian", g, "-M", "5", "--solver", "tabu", "--reads", "2", "--time-limit", "0.2",
                 "-k", "3", "--bound", "--out", str(out)]) == 0
    info = read_json(str(out) + ".json")["solver_info"]
    assert info["lower_bound"] <= best + 1e-12 and info["gap"] >= -1e-12
    assert "certified lower bound" in capsys.readouterr().out
    assert main(["solve", "--hessian", g, "-M", "5", "-k", "3", "--bound", "--out", str(tmp_path / "e.csv")]) == 0
    info = read_json(str(tmp_path / "e.csv") + ".json")["solver_info"]
    assert info["proven_optimal"] and abs(info["lower_bound"] - best) <= 1e-12 * abs(best)
    assert "proven optimal" in capsys.readouterr().out
    assert main(["solve", "--hessian", g, "-M", "5", "--time-limit", "1", "--out", str(tmp_path / "x.csv")]) == 2
    assert "--time-limit applies to --solver tabu" in capsys.readouterr().err
