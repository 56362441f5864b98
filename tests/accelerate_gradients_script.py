"""Run by test_accelerate.py under `accelerate launch --num_processes 2 --cpu`: gradients, gathered."""

import sys

import torch
from accelerate import Accelerator
from conftest import varied_calibration

from cbo_utils.gradients import collect_gate_gradients
from cbo_utils.model.tiny import build_tiny

if __name__ == "__main__":
    acc = Accelerator(cpu=True)
    model, tok = build_tiny("tiny-llama")
    res = collect_gate_gradients(model, varied_calibration(tok, n=5), accelerator=acc, progress=False)
    if acc.is_main_process:
        torch.save({"A": res.A, "processes": torch.tensor(res.meta["processes"])}, sys.argv[1])
    acc.wait_for_everyone()
