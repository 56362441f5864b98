"""Verified means verified, and a user error is a user error: every input that cannot give a meaningful result is
refused before any work — exit 2 and one line naming the input and the remedy, no traceback, nothing written —
and the checks behind "verified" look at the weights.

The table :data:`CASES` runs ``cbo_utils.cli.main(argv)`` in-process in a folder of prepared inputs; the direct tests
below it cover what is not a command line: ``check_student_of_teacher``, the divergence and no-change guards of
``distill``, ``DistillConfig.check``, the ``weights_finite`` check of ``verify_export`` and numpy integers in
``compress``."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cbo_utils import cli

CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(CUDA, reason="the refusal is for machines without a CUDA GPU")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "CBO_DEBUG": "", "PYTHONWARNINGS": "ignore"}
STATES_HEADER = "rank,energy,removed_blocks,solver,seed,feasible,tie\n"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _edit_weights(folder: Path, change) -> None:
    st = folder / "model.safetensors"
    save_file(change(load_file(st)), st, metadata={"format": "pt"})


def _edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _states(d: Path, name: str, rows: str, sidecar: dict | None = None) -> None:
    (d / name).write_text(STATES_HEADER + rows)
    if sidecar is not None:
        (d / f"{name}.json").write_text(json.dumps({"solver_info": sidecar}))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of inputs: a good tiny-llama checkpoint (tied embeddings), broken copies of it, pruned folders with
    malformed records, states tables, tensors, profiles, truncated GGUF files and a compress folder."""
    from cbo_utils.model.load import smollm2_gguf
    from cbo_utils.model.tiny import build_tiny

    d = tmp_path_factory.mktemp("validation")
    model, tok = build_tiny("tiny-llama")
    model.save_pretrained(d / "good")
    tok.save_pretrained(d / "good")
    for name in ("missing", "extra", "shape", "nan"):
        shutil.copytree(d / "good", d / name)
    _edit_weights(d / "missing", lambda sd: {k: v for k, v in sd.items() if ".layers.2." not in k})
    _edit_json(d / "extra" / "config.json", lambda c: {**c, "num_hidden_layers": 5})      # weights of 6 layers
    _edit_json(d / "shape" / "config.json", lambda c: {**c, "intermediate_size": 100})     # weights say 128
    _edit_weights(d / "nan", lambda sd: {**sd, "model.layers.1.mlp.up_proj.weight":
                                         sd["model.layers.1.mlp.up_proj.weight"] * float("nan")})

    assert cli.main(["prune", "--model", "tiny-llama", "--remove", "1", "--out", str(d / "pruned")]) == 0
    for name, change in (("rec_list", lambda r: [1]),
                         ("rec_strings", lambda r: {**r, "removed_blocks": ["1"]})):
        shutil.copytree(d / "pruned", d / name)
        _edit_json(d / name / "removed_blocks.json", change)

    _states(d, "nan_energy.csv", "0,nan,1 2,exact,,True,False\n1,0.5,1 3,exact,,True,False\n")
    _states(d, "dup_rank.csv", "0,0.1,1 2,exact,,True,False\n0,0.5,1 3,exact,,True,False\n")
    _states(d, "frac_rank.csv", "0,0.1,1 2,exact,,True,False\n1.5,0.5,1 3,exact,,True,False\n")
    _states(d, "infeasible.csv", "0,0.1,1 2,exact,,True,False\n1,0.5,1 3 4,exact,,True,False\n")
    _states(d, "negative.csv", "0,0.1,-1 2,exact,,True,False\n")
    _states(d, "range.csv", "0,0.1,1 2,exact,,True,False\n1,0.2,2 7,exact,,True,False\n", {"N": 6, "M": 2})
    _states(d, "sidecar_M.csv", "0,0.1,1 2 3,exact,,True,False\n", {"N": 6, "M": 2})
    _states(d, "repeat_block.csv", "0,0.1,2 2,exact,,True,False\n")
    _states(d, "feasible_word.csv", "0,0.1,1 2,exact,,maybe,False\n")

    torch.save(torch.randn(6, 4, dtype=torch.complex64), d / "complex.pt")
    H = torch.randn(4, 4, dtype=torch.complex128)
    torch.save(H + H.conj().T, d / "complex_matrix.pt")
    save_file({"A": torch.randn(6, 4, dtype=torch.complex64)}, d / "complex.safetensors")
    save_file({"A": torch.randn(6, 4), "H_exact": torch.full((4, 4), float("nan"))}, d / "nan_hexact.safetensors")

    profiles = {"m_empty": "M_values: []", "solver": "solver: quantum", "energy": "energy: qaoa",
                "ppl_texts": "compare:\n  ppl_texts: [boolq, wiki]", "device_map": "device_map: tpu",
                "models": "models: []", "task_source": "compare:\n  task_source: web"}
    for name, text in profiles.items():
        (d / f"{name}.yaml").write_text(f"extends: tiny\n{text}\n")

    with open(smollm2_gguf(), "rb") as fh:
        src = fh.read(65536)
    (d / "header.gguf").write_bytes(src[:100])
    (d / "vocab.gguf").write_bytes(src)
    (d / "empty.gguf").write_bytes(b"")

    from cbo_utils.core.artifacts import claim_folder
    from cbo_utils.select.methods import method_name

    params = {"model": "tiny-llama", "M": 1, "method": method_name("cbo"), "calibration": "embedded", "samples": 16,
              "max_tokens": 128, "retrain_steps": 0, "dtype": "float32", "seed": 0, "gguf": False}   # `-M 1`'s
    for name, rec in (("c_list", []), ("c_blocks", {"parameters": params, "steps": {"select": {
            "seconds": 1.0, "removed_blocks": "1 2"}}})):
        claim_folder(d / name, "compress")
        (d / name / "compress.json").write_text(json.dumps(rec))
    (d / "canary.txt").write_text("a user's file\n")
    return d


T = ("--model", "tiny-llama")
R = ("retrain", "--teacher", "tiny-llama", "--remove", "1", "--out", "r")
PRUNE = ("prune", "--remove", "1", "--out", "p", "--model")
STATES = ("prune", *T, "--out", "p", "--states")
SOLVE = ("solve", "-M", "2", "--out", "s.csv", "--hessian")

#: (id, argv, exit code, a word stderr must contain)
CASES = [
    # 1. a checkpoint that does not fill its model, does not fit its config, or holds NaN
    ("prune-missing-layer", [*PRUNE, "missing"], 2, "incomplete"),
    ("blocks-missing-layer", ["blocks", "--model", "missing"], 2, "model.layers.2."),
    ("prune-unexpected-layer", [*PRUNE, "extra"], 2, "config.json"),
    ("prune-shape-mismatch", [*PRUNE, "shape"], 2, "does not match"),
    ("prune-nan-weights", [*PRUNE, "nan"], 2, "NaN"),
    # 2. retraining settings that cannot work, an NF4 teacher without a GPU, a malformed student record
    ("retrain-lr-1e30", [*R, "--lr", "1e30"], 2, "--lr"),
    ("retrain-temperature-tiny", [*R, "--temperature", "1e-30"], 2, "--temperature"),
    ("retrain-temperature-huge", [*R, "--temperature", "1e6"], 2, "--temperature"),
    ("retrain-batch-not-multiple", [*R, "--batch-size", "16", "--micro-batch-size", "5"], 2, "batch arithmetic"),
    ("retrain-micro-exceeds-batch", [*R, "--batch-size", "4", "--micro-batch-size", "8"], 2, "batch arithmetic"),
    ("retrain-one-step-at-lr-0", [*R, "--max-steps", "1"], 2, "--warmup-steps"),
    pytest.param("retrain-nf4-cpu", [*R, "--teacher-dtype", "nf4"], 2, "--teacher-dtype", marks=no_cuda),
    ("retrain-student-record-list", ["retrain", "--teacher", "tiny-llama", "--student", "rec_list", "--out", "r"], 2,
     "removed_blocks.json"),
    ("retrain-student-record-strings", ["retrain", "--teacher", "tiny-llama", "--student", "rec_strings", "--out",
                                        "r"], 2, "removed_blocks"),
    # 3. device maps, empty --stages / -M
    pytest.param("blocks-device-map-cuda", ["blocks", *T, "--device-map", "cuda"], 2, "CUDA", marks=no_cuda),
    pytest.param("blocks-device-map-json-gpu", ["blocks", *T, "--device-map", '{"": 0}'], 2, "CUDA", marks=no_cuda),
    ("blocks-device-map-json-tpu", ["blocks", *T, "--device-map", '{"": "tpu"}'], 2, "tpu"),
    ("blocks-device-map-json-empty", ["blocks", *T, "--device-map", "{}"], 2, "non-empty"),
    ("compare-empty-stages", ["compare", "--profile", "tiny", "--stages"], 2, "--stages"),
    ("compare-empty-M", ["compare", "--profile", "tiny", "-M"], 2, "-M"),
    # 4. profiles: empty lists, enum-like values outside their choices
    ("profile-M-values-empty", ["compare", "--profile", "m_empty.yaml"], 2, "M_values"),
    ("profile-solver", ["compare", "--profile", "solver.yaml"], 2, "quantum"),
    ("profile-energy", ["compare", "--profile", "energy.yaml"], 2, "fisher"),
    ("profile-ppl-texts", ["compare", "--profile", "ppl_texts.yaml"], 2, "compare.ppl_texts"),
    ("profile-device-map", ["compare", "--profile", "device_map.yaml"], 2, "device_map"),
    ("profile-models-empty", ["compare", "--profile", "models.yaml"], 2, "models"),
    ("profile-task-source", ["compare", "--profile", "task_source.yaml"], 2, "compare.task_source"),
    # 5. states tables
    ("states-nan-energy", [*STATES, "nan_energy.csv"], 2, "line 2"),
    ("states-duplicate-rank", [*STATES, "dup_rank.csv"], 2, "repeats"),
    ("states-fractional-rank", [*STATES, "frac_rank.csv"], 2, "1.5"),
    ("states-infeasible-row", [*STATES, "infeasible.csv"], 2, "infeasible"),
    ("states-negative-block", [*STATES, "negative.csv"], 2, "negative.csv, line 2"),
    ("states-block-out-of-range", [*STATES, "range.csv"], 2, "line 3"),
    ("states-count-not-sidecar-M", [*STATES, "sidecar_M.csv"], 2, "M = 2"),
    ("states-repeated-block", [*STATES, "repeat_block.csv"], 2, "repeat_block.csv, line 2"),
    ("states-feasible-not-bool", [*STATES, "feasible_word.csv"], 2, "maybe"),
    # 6. complex or non-finite matrices / gradients
    ("solve-complex-pt", [*SOLVE, "complex.pt"], 2, "complex"),
    ("solve-complex-matrix", [*SOLVE, "complex_matrix.pt", "--input-kind", "matrix"], 2, "complex"),
    ("solve-complex-safetensors", [*SOLVE, "complex.safetensors"], 2, "complex"),
    ("solve-nan-exact-hessian", [*SOLVE, "nan_hexact.safetensors"], 2, "H_exact"),
    # 7. user errors that were reported as bugs
    ("prune-gguf-truncated-header", [*PRUNE, "header.gguf"], 2, "header.gguf"),
    ("blocks-gguf-truncated", ["blocks", "--model", "vocab.gguf"], 2, "truncated"),
    ("blocks-gguf-empty", ["blocks", "--model", "empty.gguf"], 2, "empty.gguf"),
    ("verify-record-list", ["verify", "rec_list", "--original", "tiny-llama"], 2, "removed_blocks.json"),
    ("verify-record-strings", ["verify", "rec_strings", "--original", "tiny-llama"], 2, "whole numbers"),
    ("compress-json-list", ["compress", *T, "-M", "1", "--out", "c_list"], 2, "compress.json"),
    ("compress-json-blocks", ["compress", *T, "-M", "1", "--out", "c_blocks"], 2, "removed_blocks"),
    # controls: what must keep working (a tied-embedding checkpoint has no lm_head tensor; that is not missing)
    ("prune-good-tied-checkpoint", [*PRUNE, "good"], 0, ""),
]
WRITES = {"prune-good-tied-checkpoint": "p"}   # cases whose output is expected (removed after the check)


def _case_id(c):
    return c.values[0] if hasattr(c, "values") else c[0]


def run_main(argv) -> int:
    try:
        return cli.main(list(argv))
    except SystemExit as exc:   # argparse refuses an argument by exiting 2
        return exc.code


@pytest.mark.parametrize("case,argv,code,word", CASES, ids=[_case_id(c) for c in CASES])
def test_a_bad_input_is_refused_before_any_work(inputs, monkeypatch, capsys, case, argv, code, word):
    monkeypatch.chdir(inputs)
    before = _files(inputs)
    rc = run_main(argv)
    out, err = capsys.readouterr()
    assert rc == code, (rc, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert "bug in cbo" not in err, err[-1000:]
    assert word in err, err[-1500:]
    if code == 2:   # one line of ours (argparse's usage line above it for an argument error)
        ours = [ln for ln in err.splitlines() if ln.startswith(("cbo ", "cbo: "))]
        assert len(ours) == 1, err[-1500:]
    if case in WRITES:
        assert (inputs / WRITES[case]).is_dir()
        shutil.rmtree(inputs / WRITES[case])
    after = _files(inputs)
    assert sorted(after) == sorted(before), sorted(set(after) ^ set(before))   # nothing new, nothing removed
    assert all(after[p] == b for p, b in before.items())                       # nothing changed


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


def test_a_closed_pipe_is_quiet(tmp_path):
    """`cbo blocks … | head -1`: the reader is gone before cbo writes — no "Broken pipe" message, no traceback, no
    "Exception ignored" at the interpreter's exit, status 141 (128 + SIGPIPE)."""
    p = subprocess.Popen([sys.executable, "-m", "cbo_utils.cli", "blocks", *T], cwd=tmp_path, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()   # before the model is built: every write of cbo meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err[-2000:]
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err[-2000:]


# ----------------------------------------------------------------------------------------- the student's weights
@pytest.fixture(scope="module")
def pruned_student(inputs):
    from cbo_utils.model.load import load_model

    student, _ = load_model(str(inputs / "pruned"))
    return student, json.loads((inputs / "pruned" / "removed_blocks.json").read_text())["removed_blocks"]


def test_a_pruned_copy_is_accepted_as_the_student_of_its_teacher(pruned_student):
    from cbo_utils.model.tiny import build_tiny
    from cbo_utils.prune.distill import check_student_of_teacher

    student, removed = pruned_student
    teacher, _ = build_tiny("tiny-llama")
    assert removed == [1]
    check_student_of_teacher(student, teacher, removed)
    check_student_of_teacher(student, copy.deepcopy(teacher).to(torch.bfloat16), removed)   # the default bf16 teacher
    check_student_of_teacher(copy.deepcopy(student).to(torch.bfloat16), teacher, removed)   # a bf16 student
    with pytest.raises(ValueError, match="block 1 differs"):   # the wrong removal: block 1 kept in its place
        check_student_of_teacher(student, teacher, [2])
    with pytest.raises(ValueError, match="has 5 blocks"):
        check_student_of_teacher(student, teacher, [1, 2])


def test_a_student_with_other_weights_is_refused(pruned_student):
    from cbo_utils.model.tiny import build_tiny, tiny_llama
    from cbo_utils.prune.distill import check_student_of_teacher

    student, removed = pruned_student
    teacher, _ = build_tiny("tiny-llama")
    other, _ = tiny_llama(seed=1)   # the same architecture, other random weights
    with pytest.raises(ValueError, match=r"--student .* was not pruned from --teacher .*block 0 differs"):
        check_student_of_teacher(student, other, removed, student_name="pruned", teacher_name="other")
    changed = copy.deepcopy(student)
    with torch.no_grad():
        changed.model.layers[3].mlp.up_proj.weight[0, 0] += 1e-3   # teacher block 4 (block 1 removed)
    with pytest.raises(ValueError, match="block 4 differs.*mlp.up_proj.weight"):
        check_student_of_teacher(changed, teacher, removed)
    changed = copy.deepcopy(student)
    with torch.no_grad():
        changed.model.embed_tokens.weight[5] *= 2
    with pytest.raises(ValueError, match="embeddings"):
        check_student_of_teacher(changed, teacher, removed)


# ----------------------------------------------------------------------------------------- retraining guards
def _kd(tok):
    from cbo_utils.prune.distill import KDData

    g = torch.Generator().manual_seed(0)

    def seqs(n):
        return [torch.randint(3, len(tok), (10 + (7 * i) % 13,), generator=g) for i in range(n)]

    return KDData(seqs(16), seqs(4), {"source": "random-test"})


def _teacher_student():
    from cbo_utils.model.blocks import remove_blocks
    from cbo_utils.model.tiny import build_tiny

    teacher, tok = build_tiny("tiny-llama")
    student = copy.deepcopy(teacher)
    remove_blocks(student, [1, 4])
    return teacher, student, tok


RESULT_FILES = ("model.safetensors", "retraining.json", "config.json", "train_log.csv")


def test_lr_1e30_is_refused_before_any_work(tmp_path):
    from cbo_utils.prune.distill import DistillConfig, distill

    teacher, student, tok = _teacher_student()
    cfg = DistillConfig(lr=1e30, batch_size=4, micro_batch_size=2, max_steps=3, warmup_steps=0, save_every=1)
    with pytest.raises(ValueError, match="lr"):
        distill(student, teacher, tok, _kd(tok), cfg, tmp_path / "kd", progress=False)
    assert not (tmp_path / "kd").exists()


def test_a_diverging_run_stops_and_saves_no_result(tmp_path, monkeypatch):
    """Behind the settings check (switched off here): the loss turns non-finite at step 2 — the run stops with the
    step and a lower --lr, the NaN model is not saved, the last good checkpoint (finite weights) stays."""
    from cbo_utils.prune.distill import DistillConfig, DivergenceError, distill

    monkeypatch.setattr(DistillConfig, "check", lambda self, cli=False: self)
    teacher, student, tok = _teacher_student()
    cfg = DistillConfig(lr=1e30, batch_size=4, micro_batch_size=2, max_steps=3, warmup_steps=0, save_every=1)
    out = tmp_path / "kd"
    with pytest.raises(DivergenceError, match=r"step 2 of 3.*lower --lr.*last good checkpoint.*step 1"):
        distill(student, teacher, tok, _kd(tok), cfg, out, progress=False)
    assert not any((out / f).exists() for f in RESULT_FILES)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1
    saved = load_file(out / "checkpoint" / "student.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_a_run_that_changes_no_weight_fails(tmp_path, monkeypatch):
    from cbo_utils.prune.distill import DistillConfig, DivergenceError, distill

    monkeypatch.setattr(DistillConfig, "check", lambda self, cli=False: self)
    teacher, student, tok = _teacher_student()
    cfg = DistillConfig(lr=1e-3, batch_size=4, micro_batch_size=2, max_steps=2, warmup_steps=0, save_every=0,
                        temperature=1e-30)
    with pytest.raises(DivergenceError, match="changed no weight"):
        distill(student, teacher, tok, _kd(tok), cfg, tmp_path / "kd", progress=False)
    assert not any((tmp_path / "kd" / f).exists() for f in RESULT_FILES)


@pytest.mark.parametrize("kw, word", [
    ({"temperature": 1e-30}, "temperature"), ({"temperature": 0.01}, "temperature"),
    ({"temperature": 1e4}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"lr": 2.0}, "lr"), ({"lr": float("inf")}, "lr"),
    ({"batch_size": 16, "micro_batch_size": 5}, "batch arithmetic"),
    ({"batch_size": 4, "micro_batch_size": 8}, "batch arithmetic"),
    ({"max_steps": 1, "warmup_steps": 1}, "warmup_steps"),
    ({"epochs": float("inf")}, "epochs"),
    ({"weight_decay": 2e4, "lr": 1e-4}, "weight_decay"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"teacher_dtype": "int8"}, "teacher_dtype"),
    ({"student_dtype": "nf4"}, "student_dtype"),
    ({"save_every": -1}, "save_every"),
])
def test_distill_config_check_refuses_what_cannot_work(kw, word):
    from cbo_utils.prune.distill import DistillConfig

    with pytest.raises(ValueError, match=word):
        DistillConfig(**kw).check()
    with pytest.raises(ValueError, match=word):   # a profile's retrain.train section
        DistillConfig.from_dict(kw)


def test_distill_config_check_accepts_the_profiles_and_names_cli_flags():
    from cbo_utils.core.profiles import load_profile
    from cbo_utils.prune.distill import DistillConfig

    for name in ("tiny", "mini", "paper"):
        r = load_profile(name)["retrain"]
        DistillConfig.from_dict(r["train"])
        for over in (r.get("per_model") or {}).values():
            DistillConfig.from_dict({**r["train"], **over})
    DistillConfig().check()
    DistillConfig(max_steps=1, warmup_steps=0, temperature=0.05).check()
    DistillConfig(temperature=100.0, lr=1.0).check()
    with pytest.raises(ValueError, match="--micro-batch-size"):
        DistillConfig(batch_size=6, micro_batch_size=4).check(cli=True)


# ----------------------------------------------------------------------------------------- verify, compress
def test_verify_export_fails_an_export_with_nonfinite_weights(inputs, tmp_path):
    from cbo_utils.model.tiny import build_tiny
    from cbo_utils.prune.export import verify_export

    folder = tmp_path / "p"
    shutil.copytree(inputs / "pruned", folder)
    original, tok = build_tiny("tiny-llama")
    assert verify_export(folder, original, tok, write=False)["checks"]["weights_finite"]["ok"]
    _edit_weights(folder, lambda sd: {**sd, "model.layers.0.mlp.up_proj.weight":
                                      sd["model.layers.0.mlp.up_proj.weight"] * float("inf")})
    rep = verify_export(folder, original, tok, write=False, raise_on_fail=False)
    assert not rep["ok"] and rep["checks"]["weights_finite"]["nonfinite_tensors"] == [
        "model.layers.0.mlp.up_proj.weight"]


def test_compress_takes_numpy_integers_and_refuses_other_numbers(tmp_path):
    from cbo_utils.experiments.compress import CompressError, compress

    # np.int64 passes the argument check: the refusal comes from the model (6 blocks), not from the type
    with pytest.raises(CompressError, match="the model has 6 blocks"):
        compress("tiny-llama", np.int64(6), tmp_path / "c", progress=False, echo=lambda *a: None)
    for bad in (np.float64(1.0), 1.0, True, np.bool_(True), "1"):
        with pytest.raises(CompressError, match="must be an integer"):
            compress("tiny-llama", bad, tmp_path / "c", progress=False, echo=lambda *a: None)
    assert not (tmp_path / "c").exists()
