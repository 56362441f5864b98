"""GPU code paths (skipped without CUDA; run them on a GPU machine with `pytest tests/test_cuda.py`)."""

import copy

import numpy as np
import pytest
import torch
from conftest import varied_calibration

from cbo_utils.gradients import collect_gate_gradients, exact_gate_hessian
from cbo_utils.model.tiny import build_tiny
from cbo_utils.problem.ising import BlockRemovalProblem
from cbo_utils.prune.export import export_pruned, verify_export
from cbo_utils.solvers.exact import exact_lowest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-nemotron-h"])
def test_cuda_gradients_equal_cpu(name):
    model, tok = build_tiny(name)
    calib = varied_calibration(tok, n=3)
    cpu = collect_gate_gradients(model, calib, progress=False)
    gpu = collect_gate_gradients(copy.deepcopy(model).cuda(), calib, batch_size=2, progress=False)
    torch.testing.assert_close(gpu.A, cpu.A, rtol=2e-3, atol=1e-5)
    assert "cuda" in gpu.meta["device"] and gpu.meta["peak_cuda_gb"] >= 0


def test_cuda_exact_hessian_and_bf16():
    model, tok = build_tiny("tiny-llama")
    calib = varied_calibration(tok, n=2)
    H_cpu = exact_gate_hessian(model, list(calib))
    H_gpu = exact_gate_hessian(copy.deepcopy(model).cuda(), list(calib))
    torch.testing.assert_close(H_gpu, H_cpu, rtol=5e-3, atol=1e-5)
    bf = collect_gate_gradients(copy.deepcopy(model).cuda().to(torch.bfloat16), calib, progress=False)
    assert torch.isfinite(bf.A).all() and (bf.A != 0).any()


def test_cuda_enumeration_equals_cpu():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(256, 32))
    p = BlockRemovalProblem.from_hessian(A.T @ A / 256, 8)
    cpu = exact_lowest(p, k=50, device="cpu", progress=False)
    gpu = exact_lowest(p, k=50, device="cuda", progress=False)
    assert list(gpu["removed_blocks"]) == list(cpu["removed_blocks"])
    np.testing.assert_allclose(gpu["energy"], cpu["energy"], rtol=1e-12)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-nemotron-h"])
def test_cuda_export_verifies(name, tmp_path):
    model, tok = build_tiny(name)
    model = model.cuda()
    out = export_pruned(copy.deepcopy(model), tok, [1, 3], tmp_path / "p")
    assert verify_export(out, model, tok)["ok"]


def test_device_map_auto_gradients_and_verify(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = build_tiny("tiny-llama")
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map="auto")
    calib = varied_calibration(tok, n=2)
    ref = collect_gate_gradients(model, calib, progress=False)
    got = collect_gate_gradients(sharded, calib, progress=False)
    torch.testing.assert_close(got.A, ref.A, rtol=2e-3, atol=1e-5)
    out = export_pruned(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), tok, [2], tmp_path / "p")
    assert verify_export(out, sharded, tok)["ok"]


def test_cuda_distillation_step_equals_cpu_and_bf16_runs(tmp_path):
    """One KD step on the GPU equals the CPU step (fp32); a bf16 student with a bf16 teacher trains and lowers
    the held-out KL; the NF4 teacher loads where bitsandbytes is installed."""
    from test_distill import random_data, teacher_student

    from cbo_utils.prune.distill import DistillConfig, distill

    teacher, s_cpu, tok = teacher_student()
    data = random_data(tok)
    cfg = DistillConfig(lr=1e-2, batch_size=4, micro_batch_size=2, max_steps=1, warmup_steps=0, save_every=0)
    distill(s_cpu, teacher, tok, data, cfg, tmp_path / "cpu", progress=False, save_model=False)
    _, s_gpu, _ = teacher_student()
    distill(s_gpu.cuda(), copy.deepcopy(teacher).cuda(), tok, data, cfg, tmp_path / "gpu", progress=False,
            save_model=False)
    for (n, a), (_, b) in zip(s_cpu.named_parameters(), s_gpu.named_parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-3, atol=2e-5, msg=n)
    _, s16, _ = teacher_student()
    cfg16 = DistillConfig(lr=1e-3, batch_size=4, micro_batch_size=2, epochs=3.0, warmup_steps=1, save_every=0)
    res = distill(s16.cuda().to(torch.bfloat16), copy.deepcopy(teacher).cuda().to(torch.bfloat16), tok, data,
                  cfg16, tmp_path / "bf16", progress=False, save_model=False)
    assert res.heldout_kl_after < res.heldout_kl_before


def test_cuda_nf4_teacher_loads_when_bitsandbytes_is_present(tmp_path):
    pytest.importorskip("bitsandbytes")
    from cbo_utils.prune.distill import load_teacher

    model, tok = build_tiny("tiny-llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    teacher, _ = load_teacher(str(tmp_path / "m"), "nf4")
    ids = torch.randint(3, len(tok), (1, 12), device="cuda")
    assert torch.isfinite(teacher(ids).logits).all()
