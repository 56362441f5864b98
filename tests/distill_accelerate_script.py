"""Run by test_distill.py under torchrun with 2 CPU processes: one distillation step, parameters saved."""

import sys

import torch
from accelerate import Accelerator
from safetensors.torch import save_model
from test_distill import random_data, teacher_student

from cbo_utils.prune.distill import DistillConfig, distill

if __name__ == "__main__":
    acc = Accelerator(cpu=True)
    teacher, student, tok = teacher_student()
    cfg = DistillConfig(lr=1e-2, batch_size=4, micro_batch_size=1, max_steps=1, warmup_steps=0, save_every=0,
                        teacher_dtype="float32")
    distill(student, teacher, tok, random_data(tok), cfg, sys.argv[2], accelerator=acc, progress=False,
            evaluate_heldout=False, save_model=False)
    if acc.is_main_process:
        save_model(acc.unwrap_model(student) if hasattr(acc, "unwrap_model") else student, sys.argv[1])
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None
