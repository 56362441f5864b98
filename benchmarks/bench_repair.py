"""Training-free repair (cbo_utils.prune.repair) on real selections, side by side with plain removal (issue 25):
for each selection of a results folder's `selections.csv` (by default the development rule's CBO variant and SLEB,
at every M), every repair fit, the held-out perplexity on both test texts with the paired 95 % interval of
repaired / plain on the same windows, the seconds of the repair, and each run's held-out hidden-state error ratio
(after / before) with its ridge. Calibration: the default mixture (never a test text).

    python benchmarks/bench_repair.py                                  # SmolLM2, results/mini, 32 × 128 mixture
    python benchmarks/bench_repair.py --methods cbo-pairs-swap --M 8 --fits lstsq cosine
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from cbo_utils.calibration import load_calibration
from cbo_utils.core.artifacts import parse_blocks
from cbo_utils.evaluate.measure import heldout_windows
from cbo_utils.evaluate.perplexity import perplexity
from cbo_utils.evaluate.statistics import paired_log_ratio
from cbo_utils.model.load import load_model
from cbo_utils.prune.repair import FITS, repair


def selections(results: Path, methods: list[str] | None, Ms: list[int] | None) -> list[tuple[str, int, list[int]]]:
    """(method, M, removed) of ``results/selections.csv``; default methods: the development rule's default and SLEB."""
    if methods is None:
        dev = json.loads((results / "development.json").read_text())
        methods = sorted(set(dev["default"].values())) + ["sleb"]
    with open(results / "selections.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["method"] in methods and (Ms is None or int(r["M"]) in Ms)]
    return [(r["method"], int(r["M"]), parse_blocks(r["removed_blocks"])) for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--results", default="results/mini", help="the results folder whose selections are repaired")
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("-M", "--M", type=int, nargs="+")
    ap.add_argument("--fits", nargs="+", default=["lstsq", "diag", "cosine"], choices=sorted(FITS))
    ap.add_argument("--calibration", default="mix")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--windows", type=int, default=8, help="held-out windows per text (256 tokens)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    model.eval()
    calib = load_calibration(a.calibration, tok, samples=a.samples, max_tokens=a.max_tokens)
    W = heldout_windows(tok, {"ppl_seq_len": 256, "ppl_windows": a.windows, "ppl_texts": ["boolq", "lambada"]})
    dense = {t: perplexity(model, w)["perplexity"] for t, w in W.items()}
    print(f"model {a.model}, calibration {a.calibration} {a.samples} × {a.max_tokens} tokens, {a.windows} × 256 "
          f"tokens per text; dense BoolQ {dense['boolq']:.2f}, LAMBADA {dense['lambada']:.2f}\n")
    print("| method | M | removed | fit | seconds | BoolQ ppl | × plain [95 % CI] | LAMBADA ppl | × plain [95 % CI] | "
          "runs: held-out error ratio (ridge) |\n|---|---|---|---|---|---|---|---|---|---|")
    for method, M, removed in selections(Path(a.results), a.methods, a.M):
        plain = {t: perplexity(model, w, removed=removed) for t, w in W.items()}
        print(f"| {method} | {M} | {' '.join(map(str, removed))} | plain | 0 | {plain['boolq']['perplexity']:.2f} | "
              f"1 | {plain['lambada']['perplexity']:.2f} | 1 | |", flush=True)
        for fit in a.fits:
            t0 = time.perf_counter()
            rep, records, _ = repair(model, removed, calib, fit=fit)
            dt = time.perf_counter() - t0
            cells = []
            for t, w in W.items():
                r = perplexity(rep, w)
                pr = paired_log_ratio(r["window_nll"], plain[t]["window_nll"], r["window_tokens"])
                cells.append(f"{r['perplexity']:.2f} | {pr['ratio']:.3f} [{pr['ratio_lo']:.3f}, {pr['ratio_hi']:.3f}]"
                             + (" **real**" if pr["separated"] else ""))
            runs = "; ".join(f"{r.p}→{r.run[-1]}: {r.heldout_mse_after / r.heldout_mse_before:.3f} "
                             f"({r.info.get('ridge')})" if r.repaired else f"{r.run}: not repaired"
                             for r in records)
            print(f"| {method} | {M} | {' '.join(map(str, removed))} | {fit} | {dt:.1f} | {' | '.join(cells)} | "
                  f"{runs} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
