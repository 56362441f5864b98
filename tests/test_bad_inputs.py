"""The command line under bad input (issue 16): every user mistake exits non-zero with one message that names the
input and says what is wrong — no traceback, nothing left behind, nothing of the user's touched.

Each case runs ``python -m cbo_utils.cli`` in a subprocess, as a user would, in a folder of prepared bad files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cbo_utils import cli

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "CBO_DEBUG": "", "PYTHONWARNINGS": "ignore"}


def run_cbo(args, cwd, timeout=180, env=None):
    return subprocess.run([sys.executable, "-m", "cbo_utils.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or ENV)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A folder of inputs: valid ones (gradients, a pruned folder, a states table) and broken ones."""
    d = tmp_path_factory.mktemp("bad")
    assert cli.main(["gradients", "--model", "tiny-llama", "--samples", "4", "--max-tokens", "16", "--out",
                     str(d / "grads"), "--quiet"]) == 0
    assert cli.main(["gradients", "--model", "tiny-nemotron-h", "--samples", "4", "--max-tokens", "16", "--out",
                     str(d / "hgrads"), "--quiet"]) == 0
    assert cli.main(["solve", "--hessian", str(d / "grads"), "-M", "2", "-k", "3", "--out", str(d / "good.csv")]) == 0
    assert cli.main(["prune", "--model", "tiny-llama", "--remove", "1", "--out", str(d / "pruned")]) == 0
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(os.urandom(300))
    (d / "random.safetensors").write_bytes(os.urandom(300))
    (d / "empty.safetensors").write_bytes(b"")
    torch.save({"A": torch.randn(5, 4), "note": Path("x")}, d / "pickle.pt")
    torch.save(torch.randn(4, 4), d / "square.pt")
    torch.save(torch.randn(6, 4), d / "rect.pt")
    (d / "states_empty.csv").write_text("")
    (d / "states_header.csv").write_text((d / "good.csv").read_text().splitlines()[0] + "\n")
    (d / "states_binary.csv").write_bytes(bytes(range(256)) * 4)
    (d / "bad_line2.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    (d / "arrays.jsonl").write_text('[1, 2, 3]\n')
    (d / "nocontent.jsonl").write_text('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}\n')
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 100)
    (d / "badsyntax.yaml").write_text("profile: x\nmodels: [a\n")
    (d / "toplist.yaml").write_text("- a\n- b\n")
    (d / "wrongtype.yaml").write_text("extends: tiny\nM_values: two\n")
    (d / "negative.yaml").write_text("extends: tiny\nsamples: -3\n")
    (d / "unknown_compare.yaml").write_text("extends: tiny\ncompare:\n  solverr: exact\n  rerank_sampels: 3\n")
    (d / "neg_hybrid.yaml").write_text("extends: tiny\nhybrid:\n  train_steps: -5\n")
    (d / "noconfig").mkdir()
    (d / "noconfig" / "weights.bin").write_bytes(b"x")
    shutil.copytree(d / "pruned", d / "truncated")
    st = d / "truncated" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    shutil.copytree(d / "pruned", d / "badindex")
    rec = __import__("json").loads((d / "badindex" / "removed_blocks.json").read_text())
    rec["removed_blocks"] = [1, 99]
    (d / "badindex" / "removed_blocks.json").write_text(__import__("json").dumps(rec))
    (d / "afile").write_text("a user's file\n")
    (d / "adir").mkdir()
    (d / "userdir").mkdir()
    (d / "userdir" / "thesis.tex").write_text("mine\n")
    (d / "gp").mkdir()
    (d / "gp" / "gradients.partial.rank0-of-1.safetensors").write_bytes(os.urandom(200))
    (d / "ck.safetensors").write_bytes(os.urandom(200))
    (d / "canary").write_text("keep me\n")
    return d


T = ("--model", "tiny-llama")
G = ("gradients", *T, "--samples", "2", "--max-tokens", "16", "--quiet")
S = ("solve", "--hessian", "grads", "-M", "2", "--out", "s.csv")

# (id, argv, a word the message must contain)
CASES = [
    ("solve-empty-pt", ["solve", "--hessian", "empty.pt", "-M", "2", "--out", "s.csv"], "empty.pt"),
    ("solve-random-pt", ["solve", "--hessian", "random.pt", "-M", "2", "--out", "s.csv"], "random.pt"),
    ("solve-random-st", ["solve", "--hessian", "random.safetensors", "-M", "2", "--out", "s.csv"],
     "random.safetensors"),
    ("solve-empty-st", ["solve", "--hessian", "empty.safetensors", "-M", "2", "--out", "s.csv"], "empty.safetensors"),
    ("solve-pickle", ["solve", "--hessian", "pickle.pt", "-M", "2", "--out", "s.csv"], "pickle.pt"),
    ("solve-square", ["solve", "--hessian", "square.pt", "-M", "2", "--out", "s.csv"], "--input-kind"),
    ("solve-rect-as-matrix", ["solve", "--hessian", "rect.pt", "--input-kind", "matrix", "-M", "2", "--out", "s.csv"],
     "rect.pt"),
    ("solve-missing", ["solve", "--hessian", "nowhere", "-M", "2", "--out", "s.csv"], "nowhere"),
    ("solve-M0", [*S[:3], "-M", "0", "--out", "s.csv"], "-M"),
    ("solve-M-too-large", [*S[:3], "-M", "99", "--out", "s.csv"], "M = 99"),
    ("solve-time-limit", [*S, "--solver", "tabu", "--time-limit", "-3"], "--time-limit"),
    ("solve-out-dir", [*S[:5], "--out", "adir"], "adir"),
    ("solve-out-exists", [*S[:5], "--out", "afile"], "afile"),
    ("solve-only-types", [*S, "--only-types", "bogus"], "bogus"),
    ("solve-corrupt-ckpt", [*S, "--checkpoint", "ck.safetensors"], "ck.safetensors"),
    ("solve-ckpt-heuristic", [*S, "--solver", "sa", "--checkpoint", "x.safetensors"], "--checkpoint"),
    ("solve-keep-range", [*S, "--keep", "99"], "99"),
    ("solve-hybrid-all-attention", ["solve", "--hessian", "hgrads", "-M", "2", "--only-types", "attention", "--out",
                                    "s.csv"], "attention"),
    ("grad-out-file", [*G, "--out", "afile"], "afile"),
    ("grad-corrupt-partial", [*G, "--out", "gp"], "gradients.partial"),
    ("grad-exact-negative", [*G, "--out", "g2", "--exact-hessian", "-1"], "--exact-hessian"),
    ("grad-cuda", [*G, "--out", "g2", "--device", "cuda"], "cuda"),
    ("grad-device-map", [*G, "--out", "g2", "--device-map", "bogus"], "bogus"),
    ("grad-jsonl-line2", [*G, "--out", "g2", "--calibration", "jsonl:bad_line2.jsonl"], "line 2"),
    ("grad-jsonl-arrays", [*G, "--out", "g2", "--calibration", "jsonl:arrays.jsonl"], "row 1"),
    ("grad-jsonl-nocontent", [*G, "--out", "g2", "--calibration", "jsonl:nocontent.jsonl"], "row 1"),
    ("grad-text-binary", [*G, "--out", "g2", "--calibration", "text:binary.txt"], "binary.txt"),
    ("grad-jsonl-missing", [*G, "--out", "g2", "--calibration", "jsonl:missing.jsonl"], "missing.jsonl"),
    ("grad-calibration-kind", [*G, "--out", "g2", "--calibration", "csv:x.csv"], "csv:x.csv"),
    ("grad-noconfig", ["gradients", "--model", "noconfig", "--out", "g2"], "config.json"),
    ("grad-no-model", ["gradients", "--model", "no_such_model_xyz", "--out", "g2"], "no_such_model_xyz"),
    ("grad-samples-0", [*G, "--out", "g2", "--samples", "0"], "--samples"),
    ("grad-samples-word", [*G, "--out", "g2", "--samples", "two"], "two"),
    ("grad-random-removal", [*G, "--out", "g2", "--random-removal", "8,2"], "8,2"),
    ("prune-range", ["prune", *T, "--remove", "99", "--out", "p"], "99"),
    ("prune-dupes", ["prune", *T, "--remove", "1,1", "--out", "p"], "more than once"),
    ("prune-all", ["prune", *T, "--remove", "0-5", "--out", "p"], "blocks"),
    ("prune-states-empty", ["prune", *T, "--states", "states_empty.csv", "--out", "p"], "states_empty.csv"),
    ("prune-states-header", ["prune", *T, "--states", "states_header.csv", "--out", "p"], "states_header.csv"),
    ("prune-states-binary", ["prune", *T, "--states", "states_binary.csv", "--out", "p"], "states_binary.csv"),
    ("prune-rank", ["prune", *T, "--states", "good.csv", "--rank", "99", "--out", "p"], "rank 99"),
    ("prune-overwrite-cwd", ["prune", *T, "--remove", "1", "--out", ".", "--overwrite"], "current directory"),
    ("prune-overwrite-user", ["prune", *T, "--remove", "1", "--out", "userdir", "--overwrite"], "userdir"),
    ("prune-out-exists", ["prune", *T, "--remove", "2", "--out", "pruned"], "pruned"),
    ("prune-files-cwd", ["prune-files", "pruned", "--remove", "1", "--out", ".", "--overwrite"], "current directory"),
    ("verify-truncated", ["verify", "truncated", "--original", "tiny-llama"], "truncated"),
    ("verify-bad-index", ["verify", "badindex", "--original", "tiny-llama"], "badindex"),
    ("verify-not-ours", ["verify", "noconfig", "--original", "tiny-llama"], "noconfig"),
    ("verify-other-model", ["verify", "pruned", "--original", "tiny-qwen3"], "tiny-qwen3"),
    ("compare-yaml-syntax", ["compare", "--profile", "badsyntax.yaml"], "line"),
    ("compare-yaml-list", ["compare", "--profile", "toplist.yaml"], "mapping"),
    ("compare-yaml-type", ["compare", "--profile", "wrongtype.yaml"], "M_values"),
    ("compare-yaml-negative", ["compare", "--profile", "negative.yaml"], "samples"),
    ("compare-yaml-unknown", ["compare", "--profile", "unknown_compare.yaml"], "solverr"),
    ("hybrid-negative", ["hybrid", "--profile", "neg_hybrid.yaml"], "train_steps"),
    ("compare-stage", ["compare", "--profile", "tiny", "--stages", "selec"], "selec"),
    ("compare-no-profile", ["compare", "--profile", "nosuch"], "nosuch"),
    ("retrain-other-arch", ["retrain", "--teacher", "tiny-qwen3", "--student", "pruned", "--out", "r"], "pruned"),
    ("retrain-unpruned", ["retrain", "--teacher", "tiny-llama", "--student", "noconfig", "--out", "r"], "noconfig"),
    ("retrain-out-file", ["retrain", "--teacher", "tiny-llama", "--remove", "1", "--out", "afile"], "afile"),
    ("retrain-lr", ["retrain", "--teacher", "tiny-llama", "--remove", "1", "--out", "r", "--lr", "-1"], "--lr"),
    ("retrain-userdir", ["retrain", "--teacher", "tiny-llama", "--remove", "1", "--out", "userdir"], "userdir"),
    ("baseline-method", ["baseline", *T, "--method", "nosuch", "-M", "2", "--out", "b.csv"], "nosuch"),
    ("compress-M0", ["compress", *T, "-M", "0", "--out", "c"], "-M"),
]


@pytest.mark.parametrize("case,argv,word", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_clear_message(bad, case, argv, word):
    before = _files(bad)
    contents = {p: (bad / p).read_bytes() for p in before if (bad / p).is_file()}
    r = run_cbo(argv, bad)
    assert r.returncode == cli.EXIT_USAGE, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    assert word in r.stderr, r.stderr[-1500:]
    assert _files(bad) == before, sorted(_files(bad) ^ before)     # nothing left behind, nothing removed
    assert all((bad / p).read_bytes() == b for p, b in contents.items())   # nothing of the user's changed


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40


def test_debug_shows_the_traceback(bad):
    r = run_cbo(["solve", "--hessian", "random.pt", "-M", "2", "--out", "s.csv"], bad,
                env={**ENV, "CBO_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = run_cbo(["--debug", "solve", "--hessian", "random.pt", "-M", "2", "--out", "s.csv"], bad)
    assert "Traceback" in r.stderr


def test_an_internal_error_is_named_a_bug_without_a_traceback(monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(cli, "cmd_blocks", boom)
    assert cli.main(["blocks", "--model", "tiny-llama"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "bug in cbo" in err and "--debug" in err and "ZeroDivisionError" in err


def test_ctrl_c_exits_130_and_says_where_to_resume(tmp_path):
    # a background job (nohup, CI) starts with SIGINT ignored, and an ignored signal stays ignored across exec:
    # give the child the default disposition, as a terminal's Ctrl-C would find it
    p = subprocess.Popen([sys.executable, "-m", "cbo_utils.cli", *G[:-1], "--samples", "4000", "--out", "g"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in p.stderr:   # "calibration: …" is printed just before the gradient collection starts
        seen.append(line)
        if line.startswith("calibration:"):
            break
    time.sleep(1)   # inside the collection
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    err = "".join(seen) + err
    assert p.returncode == cli.EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err
    saved = sorted((tmp_path / "g").glob("gradients.partial*"))   # the message says what a rerun will really do
    assert ("resumes from" in err) == bool(saved) and ("starts from the first sample" in err) == (not saved), err


def test_rerunning_gradients_with_the_same_inputs_is_a_no_op_and_other_inputs_are_refused(bad):
    r = run_cbo(["gradients", *T, "--samples", "4", "--max-tokens", "16", "--out", "grads", "--quiet"], bad)
    assert r.returncode == 0 and "up to date" in r.stdout
    r = run_cbo(["gradients", "--model", "tiny-qwen3", "--samples", "4", "--max-tokens", "16", "--out", "grads"], bad)
    assert r.returncode == 2 and "other inputs" in r.stderr and "model" in r.stderr


def test_solve_returns_only_states_prune_accepts_on_a_hybrid(bad, tmp_path):
    from cbo_utils.gradients import load_gradients
    from cbo_utils.model.blocks import ATTENTION
    from cbo_utils.solvers.states import read_states_csv, states_blocks

    types = load_gradients(bad / "hgrads").meta["block_types"]
    att = {i for i, t in enumerate(types) if t == ATTENTION}
    assert len(att) == 2
    out = tmp_path / "h.csv"
    # the attention blocks are cheap to remove in a random tiny model or not: either way, no state removes both
    assert cli.main(["solve", "--hessian", str(bad / "hgrads"), "-M", str(len(types) - 2), "-k", "5",
                     "--out", str(out)]) == 0
    states = states_blocks(read_states_csv(out))
    assert states and all(not att <= set(s) for s in states)
    assert cli.main(["prune", "--model", "tiny-nemotron-h", "--states", str(out), "--out",
                     str(tmp_path / "hp")]) == 0


def test_a_killed_verification_is_resumed_by_the_rerun(tmp_path):
    out = tmp_path / "p"
    assert cli.main(["prune", *T, "--remove", "2", "--out", str(out), "--no-verify"]) == 0
    assert not (out / "verification.json").exists()
    assert cli.main(["prune", *T, "--remove", "2", "--out", str(out)]) == 0    # verifies instead of refusing
    assert (out / "verification.json").is_file()
    assert cli.main(["prune", *T, "--remove", "3", "--out", str(out)]) == cli.EXIT_USAGE   # another removal


def test_rerunning_solve_with_the_same_inputs_is_a_no_op(bad, tmp_path, capsys):
    out = tmp_path / "s.csv"
    argv = ["solve", "--hessian", str(bad / "grads"), "-M", "2", "-k", "3", "--out", str(out)]
    assert cli.main(argv) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert cli.main(argv) == 0 and "up to date" in capsys.readouterr().out and out.read_bytes() == before
    assert cli.main([*argv[:-2], "-k", "4", "--out", str(out)]) == cli.EXIT_USAGE      # other settings: refused
    assert cli.main([*argv[:-2], "-k", "4", "--out", str(out), "--overwrite"]) == 0  # … unless asked


def test_the_command_line_starts_without_torch(tmp_path):
    """`cbo --help` and an argument error answer before torch, transformers or pandas are imported (each command
    imports what it needs): the parser module alone must not pull them in."""
    code = ("import sys, cbo_utils.cli\n"
            "heavy = [m for m in ('torch', 'transformers', 'pandas', 'lm_eval') if m in sys.modules]\n"
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cbo(["solve", "-M", "x"], tmp_path)
    assert r.returncode == 2 and "not a whole number" in r.stderr and "Traceback" not in r.stderr
