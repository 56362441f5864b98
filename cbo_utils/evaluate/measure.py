"""The one way a selection is measured (before and after retraining): the model to evaluate for a selection row
(SWM: its merged copy), what is still missing from ``evaluations.csv``, and held-out perplexity + lm-eval tasks
appended to it. Rows already in the table are not measured again, so an interrupted run resumes."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cbo_utils.calibration import EVAL_TEXTS, eval_text
from cbo_utils.core.artifacts import parse_blocks
from cbo_utils.core.tables import add_evaluations, key_text, upsert_rows
from cbo_utils.evaluate.lmeval import evaluate_tasks, lm_eval_version, task_split
from cbo_utils.evaluate.perplexity import perplexity, perplexity_windows
from cbo_utils.select.selection import Selection
from cbo_utils.select.swm import build_swm_model


# ------------------------------------------------------------------------------------------------- running
def done_rows(table: Path, **key) -> pd.DataFrame:
    """The rows of ``table`` matching ``key`` (compared as upsert keys are: 4.0 == 4, missing == '')."""

    if not table.is_file():
        return pd.DataFrame()
    df = pd.read_csv(table)
    for k, v in key.items():
        if k not in df.columns:
            return df.iloc[0:0]
        df = df[df[k].map(key_text) == key_text(v)]
    return df


def evaluation_model(model, row):
    """The model to evaluate for a selection row and the gated removal to apply (SWM: its merged copy)."""
    if row["method"] == "sliding_window_merging":

        detail = json.loads(row["detail"]) if isinstance(row.get("detail"), str) and row["detail"] else {}
        windows = detail.get("windows")
        windows = json.loads(windows) if isinstance(windows, str) else windows
        sel = Selection("sliding_window_merging", int(row["M"]), parse_blocks(row["removed_blocks"]),
                        meta={"windows": windows})
        return build_swm_model(model, sel), None
    return model, parse_blocks(row["removed_blocks"])


def ppl_task(text: str) -> str:
    """The evaluations-table task of held-out perplexity on ``text`` (``heldout_ppl`` for BoolQ, as before)."""
    return "heldout_ppl" if text == "boolq" else f"heldout_ppl_{text}"


def heldout_windows(tok, s: dict, texts: Sequence[str] | None = None) -> dict:
    """The perplexity windows of the held-out ``texts`` (default: every text of the settings, ``ppl_texts``), the
    same for every method."""
    return {t: perplexity_windows(tok, eval_text(t), seq_len=s["ppl_seq_len"], windows=s["ppl_windows"])
            for t in (texts if texts is not None else s.get("ppl_texts") or ["boolq"])}


def missing_measurements(results: Path, key: dict, s: dict, retrained: bool) -> tuple[list[str], list[str]]:
    """What is still to measure for a selection: (the held-out texts without a perplexity, the lm-eval tasks not yet
    in the table)."""

    done = done_rows(results / "evaluations.csv", **key, retrained=retrained)
    have = {(t, key_text(lim)) for t, lim in zip(done.get("task", []), done.get("limit", []))}
    # a perplexity counts as done only on the windows asked for now (a row from other window settings is redone)
    tokens = s["ppl_windows"] * (s["ppl_seq_len"] - 1)
    ppl_done = {t for t, n in zip(done.get("task", []), done.get("n", [])) if key_text(n) == key_text(tokens)}
    texts = [t for t in s.get("ppl_texts") or ["boolq"] if ppl_task(t) not in ppl_done]
    return texts, [t for t in s["tasks"] if (t, key_text(s["limit"])) not in have]


def reuse_measurements(results: Path, key: dict, removed_blocks: str, retrained: bool, tasks: Sequence[str],
                       limit=None) -> list[str]:
    """Copy to ``key`` the measurements of ``tasks`` that another selection with the *same* removed blocks (same
    model and M, not sliding-window merging, whose merged model differs) already has at this ``limit``; the model
    evaluated would be the same, so its numbers are. Copies carry ``detail = "same removal as <method>"`` (and their
    per-window NLLs). Returns the tasks still to measure."""
    blocks = "" if removed_blocks is None or (isinstance(removed_blocks, float) and removed_blocks != removed_blocks) \
        else key_text(removed_blocks)
    if key["method"] == "sliding_window_merging" or not blocks or not (results / "evaluations.csv").is_file():
        return list(tasks)
    ev = done_rows(results / "evaluations.csv", model=key["model"], M=key["M"], retrained=retrained)
    if not len(ev):
        return list(tasks)
    same = ev[(ev["removed_blocks"].map(key_text) == blocks)
              & (ev["method"] != "sliding_window_merging")
              & ~((ev["method"] == key["method"]) & (ev["state"] == key["state"]))]
    left, copies, windows = [], [], []
    for task in tasks:
        src = same[same["task"] == task]
        if task.startswith(("heldout_ppl", "dev_ppl")):
            pass
        elif limit is not None:
            src = src[src["limit"].map(key_text) == key_text(limit)]
        if not len(src):
            left.append(task)
            continue
        first = src.iloc[0]
        src = src[(src["method"] == first["method"]) & (src["state"] == first["state"])]
        copies += [{**r, **key, "retrained": retrained, "detail": f"same removal as {first['method']}"}
                   for r in src.to_dict("records")]
        if (results / "window_nll.csv").is_file() and task.startswith("heldout_ppl"):
            w = done_rows(results / "window_nll.csv", model=key["model"], method=first["method"], M=key["M"],
                          state=first["state"], retrained=retrained, task=task)
            windows += [{**r, **{k: key[k] for k in ("model", "method", "M", "state")}, "retrained": retrained}
                        for r in w.to_dict("records")]
    if windows:
        upsert_rows(results / "window_nll.csv", windows, WINDOW_COLUMNS, WINDOW_KEY, float_format="%.17g")
    if copies:
        add_evaluations(results, [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                                  for r in copies])
    return left


WINDOW_COLUMNS = ["model", "method", "M", "state", "retrained", "task", "window", "nll", "tokens"]


WINDOW_KEY = ["model", "method", "M", "state", "retrained", "task", "window"]


def measure_selection(model, tok, key: dict, removed_blocks: str, removed, s: dict, results: Path, retrained: bool,
                      ppl_texts: Sequence[str], todo: Sequence[str], windows: dict | None = None) -> None:
    """Held-out perplexity on ``ppl_texts`` and the lm-eval ``todo`` tasks of one selection (gated with ``removed``
    when given), appended to ``evaluations.csv`` (per-window NLLs to ``window_nll.csv``, for paired intervals) — the
    one way every selection is measured, before and after retraining."""

    common = {**key, "retrained": retrained, "removed_blocks": removed_blocks}
    windows = windows or heldout_windows(tok, s, ppl_texts)
    for text in ppl_texts:
        w = windows[text]
        t0 = time.perf_counter()
        p = perplexity(model, w, removed=removed or None)
        task = ppl_task(text)
        upsert_rows(results / "window_nll.csv", [
            {**{k: common[k] for k in ("model", "method", "M", "state", "retrained")}, "task": task, "window": i,
             "nll": v, "tokens": p["window_tokens"]} for i, v in enumerate(p["window_nll"])],
            WINDOW_COLUMNS, WINDOW_KEY, float_format="%.17g")
        add_evaluations(results, [{**common, "task": task, "metric": "perplexity", "value": p["perplexity"],
                                   "stderr": None, "n": p["tokens"], "limit": None, "lm_eval_version": None,
                                   "split": EVAL_TEXTS[text], "seconds": round(time.perf_counter() - t0, 2)}])
    if todo:
        t0 = time.perf_counter()
        res = evaluate_tasks(model, tok, list(todo), limit=s["limit"], removed=removed or None,
                             source=s["task_source"])
        secs = round(time.perf_counter() - t0, 2)
        add_evaluations(results, [{**common, **r, "limit": s["limit"], "lm_eval_version": lm_eval_version(),
                                   "split": r.get("split") or task_split(r["task"], s["task_source"]),
                                   "seconds": secs} for r in res if r["task"] in todo])
