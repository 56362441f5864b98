"""Efficiency of a saved model — parameters, peak memory and prefill/generation tokens/s — measured in a fresh
process so that models measured one after another do not share a memory peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

_MEASURE = r"""
import json, resource, sys, torch
from transformers import AutoModelForCausalLM


def peak_gb():
    # VmHWM is this process's own high-water mark; ru_maxrss would include the parent's size at fork time on Linux
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


path, prompt_len, gen_len, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
from cbo_utils.evaluate.efficiency import tokens_per_second
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
params = sum(p.numel() for p in model.parameters())
speed = tokens_per_second(model, prompt_len, gen_len)
print(json.dumps({"parameters": params, "peak_rss_gb": peak_gb(), **speed, "threads": threads}))
"""


@torch.no_grad()
def tokens_per_second(model, prompt_len: int = 128, gen_len: int = 32) -> dict:
    """Prefill and greedy-generation tokens/s of ``model`` in this process (a random prompt, seeded; one warm-up
    generation first) — for models compared side by side in one run."""
    vocab = int(model.config.vocab_size)
    dev = next(model.parameters()).device
    ids = torch.randint(min(10, vocab - 1), max(11, vocab - 10), (1, prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    kw = {"do_sample": False, "pad_token_id": getattr(model.config, "pad_token_id", None) or 0}
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)   # warm-up
    t0 = time.perf_counter()
    model(ids)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, **kw)
    t_gen = time.perf_counter() - t0
    return {"prefill_tokens_per_s": prompt_len / t_prefill, "generate_tokens_per_s": gen_len / t_gen,
            "prompt_len": prompt_len, "gen_len": gen_len}


def measure_checkpoint(path, prompt_len: int = 128, gen_len: int = 32, threads: int | None = None) -> dict:
    """Parameter count, peak memory (RSS of a fresh process) and tokens/s of a saved model, measured in a separate
    process so models measured one after another do not share a memory peak. CPU, float32."""
    import os

    threads = threads or os.cpu_count() or 1
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(prompt_len), str(gen_len), str(threads)],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"measuring {path} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
