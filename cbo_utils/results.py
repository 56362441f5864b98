"""The two tidy result tables every report reads (``results/<profile>/selections.csv`` and ``evaluations.csv``),
and the efficiency measurement of exported models.

``selections.csv``: one row per selection — model, method, M, removed_blocks (space-separated 0-based original
indices), energy (if any), selection_seconds, calibration_tokens, seed, plus optional detail columns.
``evaluations.csv``: one row per measurement — model, method, M, state, task, metric, value, stderr, n, limit,
retrained, lm_eval_version (plus split/source where known).

Rows are upserted: a row with the same key replaces the old one, so rerunning a stage never duplicates results.
Writes are atomic. Load them with ``pandas.read_csv``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from .artifacts import atomic_write_text

SELECTION_COLUMNS = ["model", "method", "M", "removed_blocks", "energy", "selection_seconds", "calibration_tokens",
                     "seed"]
SELECTION_KEY = ["model", "method", "M", "seed"]
EVALUATION_COLUMNS = ["model", "method", "M", "state", "task", "metric", "value", "stderr", "n", "limit",
                      "retrained", "lm_eval_version"]
EVALUATION_KEY = ["model", "method", "M", "state", "task", "metric", "limit", "retrained"]


def _key_text(x) -> str:
    """Canonical text of a key cell: missing → '', 4.0 → '4' (a CSV round trip turns int columns with gaps into
    floats), everything else str()."""
    if x is None or (isinstance(x, float) and x != x):
        return ""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    if isinstance(x, bool):
        return str(x)
    return str(x)


def upsert_rows(path, rows: Iterable[Mapping], columns: list[str], key: list[str]) -> pd.DataFrame:
    """Add ``rows`` to the CSV at ``path`` (created if missing), replacing rows with the same ``key``."""
    path = Path(path)
    new = pd.DataFrame([dict(r) for r in rows])
    missing = [c for c in columns if c not in new.columns]
    if missing:
        raise ValueError(f"rows for {path.name} lack the columns {missing}")
    old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=new.columns)
    extra = [c for c in list(old.columns) + list(new.columns) if c not in columns]
    cols = columns + list(dict.fromkeys(extra))
    both = pd.concat([old.reindex(columns=cols), new.reindex(columns=cols)], ignore_index=True)
    keyed = both[key].apply(lambda col: col.map(_key_text)).agg("|".join, axis=1)
    out = both[~keyed.duplicated(keep="last")].reset_index(drop=True)
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())
    return out


def add_selections(results_dir, rows: Iterable[Mapping]) -> pd.DataFrame:
    return upsert_rows(Path(results_dir) / "selections.csv", rows, SELECTION_COLUMNS, SELECTION_KEY)


def add_evaluations(results_dir, rows: Iterable[Mapping]) -> pd.DataFrame:
    return upsert_rows(Path(results_dir) / "evaluations.csv", rows, EVALUATION_COLUMNS, EVALUATION_KEY)


_MEASURE = r"""
import json, resource, sys, time, torch
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
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
params = sum(p.numel() for p in model.parameters())
ids = torch.randint(10, model.config.vocab_size - 10, (1, prompt_len), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    t0 = time.perf_counter(); model(ids); t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False)
    t_gen = time.perf_counter() - t0
print(json.dumps({"parameters": params, "peak_rss_gb": peak_gb(),
                  "prefill_tokens_per_s": prompt_len / t_prefill, "generate_tokens_per_s": gen_len / t_gen,
                  "prompt_len": prompt_len, "gen_len": gen_len, "threads": threads}))
"""


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
