"""Reasoning retention of a pruned chat model: lm-eval ``aime25`` and ``gpqa_diamond_cot_zeroshot`` of the dense and
pruned checkpoints with the chat template (greedy), retention = pruned / dense; resumable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cbo_utils.core.artifacts import (
    atomic_write_text,
    provenance,
    write_sidecar,
)
from cbo_utils.evaluate.lmeval import evaluate_checkpoint

REASONING_FILE = "hybrid_reasoning.csv"


REASONING_COLUMNS = ["label", "checkpoint", "stand_in", "task", "metric", "value", "stderr", "n", "limit",
                     "dense_value", "retention", "chat_template", "gen_kwargs", "seconds"]


def _primary_rows(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[dict]:
    """One score per task: ``exact_match`` with its most lenient filter when generative (flexible-extract before
    strict-match, as lm-eval reports GPQA CoT), else ``acc_norm`` / ``acc``."""
    order = ["exact_match,flexible-extract", "exact_match,none", "exact_match", "exact_match,strict-match",
             "acc_norm", "acc"]
    out = []
    for t in tasks:
        cand = {r["metric"]: r for r in rows if r["task"] == t}
        for m in order:
            if m in cand:
                out.append(dict(cand[m]))
                break
        else:
            raise ValueError(f"lm-eval returned no usable score for task {t!r} (metrics: {sorted(cand)})")
    return out


def evaluate_reasoning(folders: Mapping[str, Path], dense_folder, tasks: Sequence[str], out_dir, *,
                       stand_in: bool, source: str = "builtin", apply_chat_template: bool = True,
                       gen_kwargs: Mapping[str, Any] | None = None, limit: int | None = None,
                       dtype: str = "bfloat16", batch_size: int = 8, system_instruction: str | None = None
                       ) -> pd.DataFrame:
    """lm-eval scores of the dense checkpoint and every pruned folder (``label → folder``), and retention =
    pruned / dense per task; rows in ``out_dir/hybrid_reasoning.csv`` (resumable: a label already measured with
    the same tasks is skipped). The paper's Nemotron evaluation: the FP8 checkpoint and its pruned copies on
    ``aime25`` and ``gpqa_diamond_cot_zeroshot`` with the chat template (``source="builtin"``; Hub data)."""

    out_dir = Path(out_dir)
    path = out_dir / REASONING_FILE
    old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=REASONING_COLUMNS)
    jobs = {"dense": Path(dense_folder), **{k: Path(v) for k, v in folders.items()}}
    rows = old.to_dict("records")
    dense = {r["task"]: r["value"] for r in rows if r["label"] == "dense"}
    for label, folder in jobs.items():
        have = {r["task"] for r in rows if r["label"] == label and str(r["limit"]) == str(limit)}
        todo = [t for t in tasks if t not in have]
        if not todo:
            continue
        t0 = time.perf_counter()
        got = evaluate_checkpoint(folder, todo, dtype=dtype, limit=limit, batch_size=batch_size, source=source,
                                  apply_chat_template=apply_chat_template, gen_kwargs=dict(gen_kwargs or {}) or None,
                                  system_instruction=system_instruction)
        secs = round(time.perf_counter() - t0, 1)
        for r in _primary_rows(got, todo):
            if label == "dense":
                dense[r["task"]] = r["value"]
            rows = [x for x in rows if not (x["label"] == label and x["task"] == r["task"])]
            rows.append({"label": label, "checkpoint": str(folder), "stand_in": stand_in, "task": r["task"],
                         "metric": r["metric"], "value": r["value"], "stderr": r.get("stderr"), "n": r.get("n"),
                         "limit": limit, "chat_template": apply_chat_template,
                         "gen_kwargs": json.dumps(dict(gen_kwargs or {}), sort_keys=True), "seconds": secs})
    for r in rows:
        d = dense.get(r["task"])
        r["dense_value"] = d
        r["retention"] = (r["value"] / d) if d not in (None, 0) and r["value"] is not None else None
    df = pd.DataFrame(rows).reindex(columns=REASONING_COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, df.to_csv(index=False, float_format="%.17g", lineterminator="\n"))
    write_sidecar(path, provenance("hybrid_reasoning", {"tasks": list(tasks), "source": source, "limit": limit,
                                                        "chat_template": apply_chat_template,
                                                        "gen_kwargs": dict(gen_kwargs or {}), "dtype": dtype,
                                                        "stand_in": stand_in},
                                   inputs={"dense_config": Path(dense_folder) / "config.json"}))
    return df
