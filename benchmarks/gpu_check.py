"""`make gpu-check`: the checks that need a CUDA GPU, in one short run (< 8 minutes on one GPU; no Hub access needed:
only the repository, its wheels and the embedded SmolLM2). Without a GPU it says so and exits 0.

1. the CUDA tests (tests/test_cuda.py);
2. bf16 vs fp32 gate gradients on SmolLM2 (16 × 128 calibration tokens): relative error of A, of the Fisher;
3. exact enumeration on CUDA: states/s against the CPU on the same problem (N = 80, M = 5), the C(80, 8) ground state
   time, and the largest M reached within 2 minutes;
4. one knowledge-distillation step of a pruned SmolLM2 on CUDA;
5. `cbo compress` on SmolLM2 with --device-map auto.

Writes results/gpu_check.json and prints it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def section(name, fn, report):
    t0 = time.perf_counter()
    try:
        report[name] = {"ok": True, **fn()}
    except Exception as e:   # report and go on: the other checks still tell something
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    report[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {json.dumps(report[name], default=str)}", flush=True)


def cuda_tests():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    return {"returncode": r.returncode, "tail": r.stdout.strip().splitlines()[-1] if r.stdout else r.stderr[-300:]}


def bf16_gradients():
    from cbo_utils.calibration import load_calibration
    from cbo_utils.gradients import collect_gate_gradients
    from cbo_utils.model.load import load_model

    m32, tok = load_model("smollm2", dtype="float32")
    calib = load_calibration("embedded", tok, samples=16, max_tokens=128)
    a = collect_gate_gradients(m32.cuda(), calib, batch_size=8, progress=False)
    del m32
    m16, _ = load_model("smollm2", dtype="bfloat16")
    b = collect_gate_gradients(m16.cuda(), calib, batch_size=8, progress=False)
    rel = lambda x, y: float((x - y).norm() / y.norm())  # noqa: E731
    return {"rel_err_A": rel(b.A, a.A), "rel_err_H": rel(b.H, a.H),
            "seconds_fp32": a.meta.get("seconds_gradients"), "seconds_bf16": b.meta.get("seconds_gradients")}


def enumeration():
    from cbo_utils.problem.ising import BlockRemovalProblem
    from cbo_utils.solvers.exact import exact_lowest

    rng = np.random.default_rng(0)
    A = rng.standard_normal((256, 80))
    H = A.T @ A / 256
    out = {}
    for dev in ("cpu", "cuda"):
        p = BlockRemovalProblem.from_hessian(H, 5)
        t0 = time.perf_counter()
        exact_lowest(p, k=20, device=dev, progress=False)
        out[f"states_per_s_M5_{dev}"] = math.comb(80, 5) / (time.perf_counter() - t0)
    out["gpu_over_cpu"] = out["states_per_s_M5_cuda"] / out["states_per_s_M5_cpu"]
    best_M, t_total = None, 0.0
    for M in range(6, 41):
        t0 = time.perf_counter()
        exact_lowest(BlockRemovalProblem.from_hessian(H, M), k=20, device="cuda", progress=False)
        dt = time.perf_counter() - t0
        out[f"seconds_M{M}"] = round(dt, 2)
        t_total += dt
        best_M = M
        if t_total > 120 or dt * math.comb(80, M + 1) / math.comb(80, M) > 120 - t_total:
            break
    out["largest_M_within_2_min"] = best_M
    return out


def distill_step():
    from cbo_utils.model.load import load_model
    from cbo_utils.prune.distill import DistillConfig, distill, kd_data, pruned_student

    teacher, tok = load_model("smollm2", dtype="bfloat16")
    student, _ = pruned_student("smollm2", [3, 7, 12], dtype="float32")
    cfg = DistillConfig(lr=1e-4, batch_size=4, micro_batch_size=4, max_steps=1, warmup_steps=0,
                        teacher_dtype="bfloat16", save_every=0)
    data = kd_data(tok, "embedded", max_length=256, heldout_max=8, max_train=16)
    with tempfile.TemporaryDirectory() as tmp:
        res = distill(student.cuda(), teacher.cuda(), tok, data, cfg, tmp, progress=False)
    return {"steps": res.steps, "heldout_kl_before": res.heldout_kl_before, "heldout_kl_after": res.heldout_kl_after}


def compress_smollm2():
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "cbo_utils.cli", "compress", "--model", "smollm2", "-M", "8",
                            "--out", f"{tmp}/smollm2-M8", "--device-map", "auto"], cwd=ROOT, capture_output=True,
                           text=True, timeout=420)
        return {"returncode": r.returncode, "summary": r.stdout[-1500:] if r.returncode == 0 else r.stderr[-1500:]}


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine — nothing to check (run `make gpu-check` on a GPU machine)")
        return 0
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in (("cuda_tests", cuda_tests), ("bf16_vs_fp32_gradients", bf16_gradients),
                     ("exact_enumeration", enumeration), ("distillation_step", distill_step),
                     ("compress_smollm2", compress_smollm2)):
        section(name, fn, report)
    out = ROOT / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu-check: {sum(v.get('ok', False) for v in report.values() if isinstance(v, dict))} of 5 sections ok "
          f"→ {out}")
    return 0 if all(v.get("ok") for v in report.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
