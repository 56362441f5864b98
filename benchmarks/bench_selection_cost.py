"""Selection cost on the same calibration tokens, side by side in one run (issue 13's cost goal): the default CBO
selection (the measured pair table once, then solving and re-ranking for every M) against SLEB's M = 8 selection
and its M = 15 path, as the comparison harness runs them (16 × 128 SciQ chat windows; CBO measures its table on the
first 12 and re-ranks on the last 4, SLEB uses all 16). Prints seconds, block forward passes and head passes (the
two costs of every measured removal) and the ratio.

    python benchmarks/bench_selection_cost.py                 # SmolLM2-135M, ≈ 15 min on 2 cores
    python benchmarks/bench_selection_cost.py --model tiny-llama --samples 8 --max-tokens 32   # seconds
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from cbo_utils.calibration import load_calibration
from cbo_utils.interactions import load_pair_table
from cbo_utils.model.blocks import num_blocks
from cbo_utils.model.load import load_model
from cbo_utils.select.baselines import greedy_prefix
from cbo_utils.select.methods import run_method


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rerank-samples", type=int, default=4)
    ap.add_argument("-M", type=int, nargs="+", default=[4, 8, 15])
    ap.add_argument("--sleb-M", type=int, default=8)
    ap.add_argument("--sleb-path-M", type=int, default=None, help="run SLEB's path this far (default: --sleb-M)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    model.eval()
    N = num_blocks(model)
    calib = load_calibration("embedded", tok, samples=a.samples, max_tokens=a.max_tokens)
    kw = {"batch_size": 8, "rerank_samples": a.rerank_samples}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for M in a.M:
            t = time.perf_counter()
            sel = run_method("cbo-pairs-rerank", model, calib, M, cache_dir=tmp, **kw)
            rows.append((f"cbo-pairs-rerank M = {M}", time.perf_counter() - t, sel.removed))
        cbo_s = time.perf_counter() - t0
        table = load_pair_table(f"{tmp}/pairs_kl_{a.samples - a.rerank_samples}.safetensors").meta
    sets = N + N * (N - 1) // 2
    t = time.perf_counter()
    path = run_method("sleb", model, calib, a.sleb_path_M or a.sleb_M, batch_size=8)
    sleb_all = time.perf_counter() - t
    at = greedy_prefix(path, a.sleb_M)
    steps = path.meta["step_seconds"]
    print(f"model {a.model} (N = {N}), calibration {a.samples} × {a.max_tokens} tokens, {a.threads} threads\n")
    print("| selection | seconds | removed (0-based) |\n|---|---|---|")
    for name, s, removed in rows:
        print(f"| {name} | {s:.1f} | {' '.join(map(str, removed))} |")
    print(f"| **CBO, all M** (pair table of {sets} sets + solve + re-rank) | **{cbo_s:.1f}** | |")
    print(f"| SLEB to M = {a.sleb_M} | {steps[a.sleb_M - 1]:.1f} | {' '.join(map(str, at.removed))} |")
    if path.M > a.sleb_M:
        print(f"| SLEB to M = {path.M} (its path) | {sleb_all:.1f} | {' '.join(map(str, path.removed))} |")
    cand = sum(max(N - 2 - t, 0) for t in range(a.sleb_M))
    print(f"\nCBO (all M) / SLEB (M = {a.sleb_M}) = **{cbo_s / steps[a.sleb_M - 1]:.2f}×** "
          f"(goal < 1); head passes: pair table {sets} on {a.samples - a.rerank_samples} windows, SLEB to "
          f"M = {a.sleb_M} {cand} on {a.samples} windows; block passes: table "
          f"{table.get('block_calls')} ({table.get('seconds')} s), SLEB path {path.meta.get('block_calls')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
