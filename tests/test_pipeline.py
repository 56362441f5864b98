"""`make reproduce` on the tiny profile: every artifact written, verified, and a rerun resumes instead of redoing."""

import json

import pandas as pd

from cbo_utils.core.profiles import load_profile
from cbo_utils.experiments.pipeline import run


def test_tiny_profile_runs_and_resumes(tmp_path, capsys):
    cfg = load_profile("tiny")
    produced = run("tiny", tmp_path, compare=False, hybrid=False)
    for model in cfg["models"]:
        d = tmp_path / model
        assert (d / "gradients.safetensors").is_file() and (d / "gradients.safetensors.json").is_file()
        for M in cfg["M_values"]:
            df = pd.read_csv(d / f"states_M{M}.csv")
            assert len(df) == cfg["k"] or len(df) > 0
            assert df["energy"].is_monotonic_increasing
            assert all(len(s.split()) == M for s in df["removed_blocks"])
            side = json.loads((d / f"states_M{M}.csv.json").read_text())
            assert side["inputs"]["ising"]["sha256"]      # states ← ising_M*.json ← gradients
            ising = json.loads((d / f"ising_M{M}.json").read_text())
            assert ising["M"] == M and len(ising["Q"]) == ising["N"]
            assert json.loads((d / f"ising_M{M}.json.json").read_text())["inputs"]["gradients"]["sha256"]
            assert json.loads((d / f"pruned_M{M}_cbo0" / "verification.json").read_text())["ok"]
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("gradients.safetensors")}
    capsys.readouterr()
    assert run("tiny", tmp_path, compare=False, hybrid=False) == produced
    out = capsys.readouterr().out
    assert out.count("gradients: up to date") == len(cfg["models"]) and "verified earlier" in out
    assert stamp == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("gradients.safetensors")}
    manifest = json.loads((tmp_path / "reproduce_manifest.json").read_text())
    assert manifest["produced"] == [str(p) for p in produced]
