"""Gradient artifacts: round trips, foreign .pt files, refusal of pickles, validation."""

import json
import pickle

import pytest
import torch

from cbo_utils.core.artifacts import atomic_write_text, format_blocks, parse_blocks, sidecar_path
from cbo_utils.gradients import GradientResult, load_gradients


def test_safetensors_round_trip_with_sidecar(tmp_path):
    A = torch.randn(9, 6, dtype=torch.float64)
    res = GradientResult.from_A(A, H_exact=torch.eye(6, dtype=torch.float64), meta={"model": "x"})
    path = res.save(tmp_path, {"parameters": {"seed": 3}})
    back = load_gradients(tmp_path)
    assert torch.equal(back.A, A) and torch.equal(back.H, res.H) and torch.equal(back.g, A.mean(0))
    assert torch.equal(back.H_exact, torch.eye(6, dtype=torch.float64))
    side = json.loads(sidecar_path(path).read_text())
    assert side["model"] == "x" and side["parameters"]["seed"] == 3
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"A", "g", "H", "H_exact"}


def test_authors_pt_files_load(tmp_path):
    A = torch.randn(2048, 32, dtype=torch.bfloat16)
    torch.save(A, tmp_path / "grads.pt")
    r = load_gradients(tmp_path / "grads.pt")
    assert r.A.dtype == torch.float64 and r.A.shape == (2048, 32)
    torch.testing.assert_close(r.H, r.A.T @ r.A / 2048)
    torch.save({"grads": A[:, :8]}, tmp_path / "d.pt")
    assert load_gradients(tmp_path / "d.pt").N == 8


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as fh:
        pickle.dump({"A": Evil()}, fh)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        load_gradients(p)


@pytest.mark.parametrize("A, words", [
    (torch.randn(5), "2-D"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "non-finite"),
    (torch.randn(4, 1), "two blocks"),
])
def test_bad_gradient_matrices_are_rejected(A, words):
    with pytest.raises(ValueError, match=words):
        GradientResult.from_A(A)


def test_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="cbo gradients"):
        load_gradients(tmp_path / "nope")


def test_block_strings_and_atomic_write(tmp_path):
    assert format_blocks([12, 3, 7]) == "3 7 12"
    assert parse_blocks("3,7 12") == [3, 7, 12] and parse_blocks("24-26 1") == [1, 24, 25, 26]
    with pytest.raises(ValueError, match="0-based"):
        parse_blocks("a b")
    atomic_write_text(tmp_path / "f.txt", "x")
    assert (tmp_path / "f.txt").read_text() == "x" and not list(tmp_path.glob(".*tmp"))


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from cbo_utils.core.artifacts import atomic_write_text

    p = atomic_write_text(tmp_path / "a.csv", "x\n")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask   # as open() would make it, not mkstemp's 0600


def test_provenance_names_no_machine_specific_directory(monkeypatch, tmp_path):
    import sys

    from cbo_utils.core import artifacts

    repo = artifacts._REPO
    f = repo / "cbo_utils" / "configs" / "tiny.yaml"
    monkeypatch.setattr(sys, "argv", [str(repo / "cbo_utils" / "experiments" / "hybrid.py"), "--profile", "mini",
                                      "--results", str(repo / "results" / "mini")])
    monkeypatch.setenv("CBO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "m.json").write_text("{}")
    rec = artifacts.provenance("x", inputs={"config": f, "cached": tmp_path / "cache" / "m.json"})
    assert rec["command"] == "python -m cbo_utils.experiments.hybrid --profile mini --results results/mini"
    assert rec["inputs"]["config"]["path"] == "cbo_utils/configs/tiny.yaml" and rec["inputs"]["config"]["sha256"]
    assert rec["inputs"]["cached"]["path"] == "$CBO_CACHE/m.json"
    assert str(repo) not in str(rec["command"]) + str(rec["inputs"])


def test_a_profile_extends_another_changing_only_what_it_names(tmp_path):
    from cbo_utils.core.profiles import load_profile

    mini, full = load_profile("mini"), load_profile("mini-full")
    assert full["profile"] == "mini-full" and "extends" not in full
    assert full["compare"]["limit"] == 100 and full["compare"]["spearman"]["lowest"] == 8
    assert full["compare"]["variants"] == mini["compare"]["variants"]            # merged key by key
    assert full["compare"]["spearman"]["variants"] == mini["compare"]["spearman"]["variants"]
    named = ("compare", "profile", "retrain")
    assert {k: v for k, v in full.items() if k not in named} == {k: v for k, v in mini.items() if k not in named}
    assert full["retrain"]["train"]["max_steps"] == 15 != mini["retrain"]["train"]["max_steps"]
    assert {k: v for k, v in full["retrain"]["train"].items() if k != "max_steps"} == \
        {k: v for k, v in mini["retrain"]["train"].items() if k != "max_steps"}
    assert {k: v for k, v in full["retrain"].items() if k != "train"} == \
        {k: v for k, v in mini["retrain"].items() if k != "train"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: mini\nprofile: x\nsamplez: 3\n")
    with pytest.raises(ValueError, match="samplez"):
        load_profile(str(bad))
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ValueError, match="more than 4 deep"):
        load_profile(str(loop))
