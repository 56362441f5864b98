"""Slow tests: several processes under accelerate, and the real SmolLM2-135M-Instruct."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import varied_calibration

from cbo_utils.gradients import collect_gate_gradients
from cbo_utils.model.tiny import build_tiny

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_processes_gather_rows_in_calibration_order(tmp_path):
    out = tmp_path / "A.pt"
    env = {**os.environ, "PYTHONPATH": f"{HERE}:{HERE.parent}", "OMP_NUM_THREADS": "1"}
    # torchrun sets RANK/WORLD_SIZE; accelerate's Accelerator picks them up (multi-CPU, gloo), exactly as under
    # `accelerate launch` on a multi-GPU machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(HERE / "accelerate_gradients_script.py"), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert int(got["processes"]) == 2
    model, tok = build_tiny("tiny-llama")
    ref = collect_gate_gradients(model, varied_calibration(tok, n=5), progress=False)
    torch.testing.assert_close(got["A"], ref.A, rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def smollm2():
    from cbo_utils.model.load import load_model

    return load_model("smollm2")


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_gate_gradients_finite_and_nonzero_for_all_30_blocks(smollm2):
    from cbo_utils.calibration import embedded

    model, tok = smollm2
    calib = embedded(tok, samples=3, max_tokens=64)
    res = collect_gate_gradients(model, calib, progress=False)
    assert res.A.shape == (3, 30)
    assert torch.isfinite(res.A).all() and (res.A.abs() > 0).all()
    assert torch.isfinite(res.H).all() and torch.linalg.eigvalsh(res.H).min() > -1e-12  # PSD


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_export_verified_and_perplexity_gated_equals_pruned(smollm2, tmp_path):
    from cbo_utils.calibration import heldout_text
    from cbo_utils.evaluate.perplexity import perplexity, perplexity_windows
    from cbo_utils.prune.export import export_pruned, verify_export

    model, tok = smollm2
    remove = [14, 20]
    win = perplexity_windows(tok, heldout_text(40), seq_len=64, windows=2)
    dense = perplexity(model, win)
    gated = perplexity(model, win, removed=remove)
    out = export_pruned(copy.deepcopy(model), tok, remove, tmp_path / "p", source="smollm2")
    rep = verify_export(out, model, tok)
    assert rep["ok"]
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.config.num_hidden_layers == 28
    p = perplexity(pruned, win)
    assert abs(p["perplexity"] - gated["perplexity"]) < 1e-3 * gated["perplexity"]
    assert 1 < dense["perplexity"] < gated["perplexity"] < 1e4
    assert win[0, 0] == tok.bos_token_id and p["seq_len"] == 64
