"""Selection cost on the same calibration tokens, side by side in one run (issue 13's cost goal, issue 24's screened
pair table): the default CBO selection at every M with the screened pair table (the singles, then the pairs among
the candidate blocks of each M, extended in place) and with the full table (every pair), against SLEB's greedy path
to the largest M, as the comparison harness runs them (the sizing of `--profile`: mini-full's 16 × 96 windows of the
default mixture by default — CBO measures its table on the first 12 and re-ranks on the last 4, SLEB uses all 16;
`--profile mini` is 8 × 80, 6 + 2). Prints seconds, measured sets, block passes and head passes
(the two costs of every measured removal), the blocks each selects (screened vs full: the same, or the measured KL
of both on the fit windows), the ratios, and the projected counts of the rule for N = 30, 32 and 80 blocks.

    python benchmarks/bench_selection_cost.py                 # SmolLM2-135M at mini-full's sizing: two CBO runs + SLEB
    python benchmarks/bench_selection_cost.py --profile mini  # the same at mini's sizing
    python benchmarks/bench_selection_cost.py --model tiny-llama --samples 8 --max-tokens 32 -M 2 3   # seconds
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time

import torch

from cbo_utils.calibration import load_calibration
from cbo_utils.core.profiles import load_profile
from cbo_utils.interactions import divergence_of_sets, load_pair_table, prefix_cache_work, screened_sets
from cbo_utils.model.blocks import num_blocks
from cbo_utils.model.load import load_model
from cbo_utils.select.cbo import DEFAULT_VARIANT, pair_table_file
from cbo_utils.select.methods import run_method

#: the projection: block counts and the M values to project (Llama-3.1-8B has 32 blocks, Llama-3.3-70B 80)
PROJECTION = {30: (4, 8, 15), 32: (4, 8, 12, 16), 80: (8, 16, 24, 32, 40)}


def screened_work(N: int, M: int, margin: int = 4, where: str = "first") -> tuple[int, int, int]:
    """The exact prefix-cache work per calibration batch of the screening rule before any extension: ``(sets, block
    calls, head passes)`` of its two runs — the singles, then the pairs among K = min(N, M + margin) candidates
    (``where``: ``first`` = the first K blocks, the costliest pairs; ``last`` = the last K, the cheapest). Block calls
    are those after the dense forward; head passes include each run's dense pass."""
    K = min(N, M + margin)
    C = range(K) if where == "first" else range(N - K, N)
    c1, h1 = prefix_cache_work(N, [], singles=True)
    c2, h2 = prefix_cache_work(N, list(itertools.combinations(C, 2)), singles=False)
    return screened_sets(N, M, margin), c1 + c2, h1 + h2


def full_work(N: int) -> tuple[int, int, int]:
    """The same for the full table (one run)."""
    calls, heads = prefix_cache_work(N)
    return N + N * (N - 1) // 2, calls, heads


def _cbo_all_M(model, calib, Ms, kw, mode, margin, variant):
    """The default CBO selection at every M with one pair table mode, in one cache folder; returns rows, seconds
    and the table's meta."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for M in Ms:
            t = time.perf_counter()
            sel = run_method(variant, model, calib, M, cache_dir=tmp, pair_table=mode, screen_margin=margin, **kw)
            rows.append({"M": M, "seconds": time.perf_counter() - t, "removed": sel.removed, "meta": sel.meta})
        total = time.perf_counter() - t0
        n_fit = len(calib) - kw["rerank_samples"]
        meta = load_pair_table(f"{tmp}/{pair_table_file(range(n_fit), mode)}").meta
    return rows, total, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--profile", default="mini-full",
                    help="the profile whose comparison sizing is the default (calibration, samples, max_tokens, "
                         "rerank_samples, screen_margin; default mini-full); the options below override it")
    ap.add_argument("--calibration", help="calibration spec (default: the profile's, the mixture)")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--rerank-samples", type=int)
    ap.add_argument("-M", "--M", type=int, nargs="+", default=[4, 8, 15])
    ap.add_argument("--screen-margin", type=int)
    ap.add_argument("--variant", default=DEFAULT_VARIANT)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    cfg = load_profile(a.profile)
    c = cfg.get("compare", {})
    for key, val in (("calibration", cfg.get("calibration", "mix")), ("samples", c.get("samples", 16)),
                     ("max_tokens", c.get("max_tokens", 96)), ("rerank_samples", c.get("rerank_samples", 4)),
                     ("screen_margin", c.get("screen_margin", 4))):
        if getattr(a, key) is None:
            setattr(a, key, val)
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    model.eval()
    N = num_blocks(model)
    Ms = sorted(a.M)
    calib = load_calibration(a.calibration, tok, samples=a.samples, max_tokens=a.max_tokens)
    kw = {"batch_size": 8, "rerank_samples": a.rerank_samples}
    n_fit = a.samples - a.rerank_samples
    fit_batches = math.ceil(n_fit / kw["batch_size"])
    scr, scr_s, scr_t = _cbo_all_M(model, calib, Ms, kw, "screened", a.screen_margin, a.variant)
    ful, ful_s, ful_t = _cbo_all_M(model, calib, Ms, kw, "full", a.screen_margin, a.variant)
    t = time.perf_counter()
    path = run_method("sleb", model, calib, max(Ms), batch_size=8)
    sleb_s = time.perf_counter() - t
    n_free = N - 2
    sleb_heads = sum(max(n_free - s, 0) for s in range(max(Ms))) * math.ceil(a.samples / 8)

    print(f"model {a.model} (N = {N}), calibration {a.samples} × {a.max_tokens} tokens ({n_fit} fit windows, "
          f"{fit_batches} batch(es)), {a.threads} threads, variant {a.variant}, screen_margin {a.screen_margin}\n")
    print("| selection | seconds | removed (0-based) | pair table |\n|---|---|---|---|")
    for mode, rows in (("screened", scr), ("full", ful)):
        for r in rows:
            m = r["meta"]
            note = (f"C = {m['pair_candidates']} ({m['pair_sets']} sets, {m['screen_rounds']} solve(s))"
                    if mode == "screened" else f"{m['detail'].split('; ')[-1]}")
            print(f"| {a.variant} {mode} M = {r['M']} | {r['seconds']:.1f} | {' '.join(map(str, r['removed']))} | "
                  f"{note} |")
    for s, step in enumerate(path.meta["step_seconds"]):
        if s + 1 in Ms:
            prefix = " ".join(map(str, sorted(path.order[:s + 1])))   # the path's first s + 1 steps
            print(f"| SLEB to M = {s + 1} (its path) | {step:.1f} | {prefix} | |")

    print("\n| cost (all M) | seconds | measured sets | block passes | head passes |\n|---|---|---|---|---|")
    fit = calib.samples[:n_fit]
    for name, s, t in (("CBO, screened table", scr_s, scr_t), ("CBO, full table", ful_s, ful_t)):
        print(f"| {name} (table {t['seconds']} s, {len(t.get('runs', []))} run(s)) | {s:.1f} | {t['sets']} | "
              f"{t['block_calls']} | {t['head_passes']} |")
    print(f"| SLEB path to M = {max(Ms)} | {sleb_s:.1f} | {sleb_heads // math.ceil(a.samples / 8)} candidates | "
          f"{path.meta.get('block_calls')} | {sleb_heads} |")
    print(f"\nratios: screened / full — seconds {scr_s / ful_s:.2f}, table seconds "
          f"{scr_t['seconds'] / max(ful_t['seconds'], 1e-9):.2f}, sets {scr_t['sets'] / ful_t['sets']:.2f}, block "
          f"passes {scr_t['block_calls'] / ful_t['block_calls']:.2f}, head passes "
          f"{scr_t['head_passes'] / ful_t['head_passes']:.2f}; CBO all M / SLEB path — screened "
          f"**{scr_s / sleb_s:.2f}×**, full {ful_s / sleb_s:.2f}× (goal < 1)")
    print(f"negative couplings among the measured pairs: screened {scr_t.get('negative_couplings'):.3f}, full "
          f"{ful_t.get('negative_couplings'):.3f}")

    print("\n| M | screened = full? | KL screened (fit) | KL full (fit) |\n|---|---|---|---|")
    for rs, rf in zip(scr, ful, strict=True):
        if rs["removed"] == rf["removed"]:
            print(f"| {rs['M']} | same | | |")
        else:
            d = divergence_of_sets(model, fit, [rs["removed"], rf["removed"]], batch_size=8)
            print(f"| {rs['M']} | differ | {d[0]:.5f} | {d[1]:.5f} |")

    print(f"\nprojection (prefix cache, per calibration batch; the rule before any coverage extension, margin "
          f"{a.screen_margin}; block calls after the dense forward, candidates = the first K blocks (costliest) … the "
          "last K (cheapest); head passes include each run's dense pass)\n")
    print("| N | M | K | sets rule / full | fraction | block calls rule (first … last K) / full | "
          "head passes rule / full |\n|---|---|---|---|---|---|---|")
    for n, ms in PROJECTION.items():
        fs, fc, fh = full_work(n)
        for M in ms:
            s1, c1, h1 = screened_work(n, M, a.screen_margin, "first")
            _, c2, _ = screened_work(n, M, a.screen_margin, "last")
            print(f"| {n} | {M} | {min(n, M + a.screen_margin)} | {s1} / {fs} | {s1 / fs:.1%} | "
                  f"{c1:,} … {c2:,} / {fc:,} ({c1 / fc:.1%} … {c2 / fc:.1%}) | {h1} / {fh} ({h1 / fh:.1%}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
