"""Retrain the selections of a profile by knowledge distillation and evaluate each model before and after.

``python -m cbo_utils.experiments.retrain --profile mini [--M 8 15] [--methods cbo-sd-rerank block_influence sleb]``
(or ``make retrain``; several GPUs: ``accelerate launch -m cbo_utils.experiments.retrain --profile paper``).

Reads the selections that the comparison harness wrote (``results/<profile>/selections.csv``), builds each pruned
student from the dense model, distils it (:func:`cbo_utils.prune.distill.distill`, the paper's recipe with the profile's
``retrain:`` settings) and evaluates it exactly as the comparison harness evaluates the un-retrained selections
(same held-out perplexity windows, same lm-eval tasks and items): rows with ``retrained = True`` in
``evaluations.csv``, next to the ``retrained = False`` rows of the same selection (measured here if missing).
Writes ``retraining.csv`` (one row per run: tokens, steps, time, held-out KL before/after) and ``retraining.md``
(the before/after tables). Retrained models are standard folders under ``results/<profile>/<model>/retrain/``.
A finished run is never repeated; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cbo_utils.calibration import EVAL_TEXTS
from cbo_utils.core.artifacts import atomic_write_text, format_blocks, parse_blocks
from cbo_utils.core.profiles import check_keys, check_like, m_values, profile_with, results_dir, slug
from cbo_utils.core.tables import markdown_table, upsert_rows
from cbo_utils.evaluate.lmeval import zero_shot_mean
from cbo_utils.evaluate.measure import done_rows, evaluation_model, measure_selection, missing_measurements
from cbo_utils.experiments.compare import compare_settings, default_variant, paired_sections, paired_table
from cbo_utils.model.load import load_model
from cbo_utils.prune.distill import DistillConfig, distill, kd_data, load_teacher, pruned_student

DEFAULTS: dict[str, Any] = {
    "methods": ["default", "block_influence", "sleb"],   # the default CBO (the comparison's) + two baselines
    "M_values": None,                                         # None: the profile's M values
    "data": {"source": "embedded", "max_length": 1024, "packing": False, "heldout_fraction": 0.01,
             "heldout_max": None, "max_train": None, "samples": None},
    "train": {},                                              # DistillConfig fields
    "per_model": {},                                          # model → DistillConfig overrides (paper: Qwen LR)
    "models": None,                                           # None: the comparison's models
    "evaluate_zero_shot": True,
}

RETRAIN_COLUMNS = ["model", "method", "M", "removed_blocks", "steps", "tokens", "seconds", "processes",
                   "heldout_kl_before", "heldout_kl_after", "loss_first", "loss_last", "lr", "batch_size",
                   "data_source", "teacher_dtype"]
RETRAIN_KEY = ["model", "method", "M"]


def retrain_settings(cfg: dict) -> dict:
    """The profile's ``retrain:`` section over :data:`DEFAULTS`, validated (unknown keys are errors)."""
    r = cfg.get("retrain") or {}
    if not isinstance(r, dict):
        raise ValueError(f"the profile's retrain: section must be a mapping, got {r!r}")
    r = dict(r)
    check_keys("retrain", r, DEFAULTS)
    check_like("retrain", r, DEFAULTS)
    s = {**DEFAULTS, **r}
    data = dict(s["data"] or {})
    check_keys("retrain.data", data, DEFAULTS["data"])
    s["data"] = {**DEFAULTS["data"], **data}
    base = dict(s["train"] or {})
    s["train"] = DistillConfig.from_dict(base)
    s["per_model"] = {m: DistillConfig.from_dict({**base, **(o or {})}) for m, o in (s["per_model"] or {}).items()}
    return s


def _student(model_name: str, sel: dict, dtype: str):
    """The pruned student for a selection row: blocks physically removed from a fresh dense copy (SWM: the merged
    model its selection describes)."""

    if sel["method"] == "sliding_window_merging":

        dense, tok = load_model(model_name, dtype=dtype)
        return evaluation_model(dense, sel)[0], tok
    return pruned_student(model_name, parse_blocks(sel["removed_blocks"]), dtype=dtype)


def _accelerator():
    """An ``accelerate.Accelerator`` when launched with several processes (``accelerate launch``/torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        return Accelerator()
    return None


def run_retrain(profile: str, results: Path | None = None, models: Sequence[str] | None = None,
                M_values: Sequence[int] | None = None, methods: Sequence[str] | None = None,
                progress: bool = True, retrain: dict | None = None) -> Path:
    """Retrain and evaluate every (model, M, method) of the profile; returns the report path. ``retrain``: the
    profile's ``retrain:`` section to use instead of the file's (the notebooks pass their parameter)."""
    import torch


    cfg = profile_with(profile, "retrain", retrain)
    s = retrain_settings(cfg)
    cs = compare_settings(cfg)
    if cs["threads"]:
        torch.set_num_threads(int(cs["threads"]))
    results = results_dir(cfg, results)
    acc = _accelerator()
    main = acc is None or acc.is_main_process
    for model_name in models or s["models"] or cs.get("models") or cfg["models"]:
        tcfg: DistillConfig = s["per_model"].get(model_name, s["train"])
        sels = done_rows(results / "selections.csv", model=model_name)
        Ms = list(M_values or s["M_values"] or m_values(cfg, model_name))
        wanted = [default_variant(results, cs, model_name) if m == "default" else m for m in methods or s["methods"]]
        if sels.empty:
            raise FileNotFoundError(f"no selections for {model_name} in {results / 'selections.csv'}: run the "
                                    f"comparison first (make compare PROFILE={cfg['profile']} or python -m "
                                    f"cbo_utils.experiments.compare --profile {cfg['profile']})")
        teacher, tok = load_teacher(model_name, tcfg.teacher_dtype)
        dev = acc.device if acc is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if tcfg.teacher_dtype != "nf4":   # an NF4 teacher is placed by bitsandbytes already
            teacher.to(dev)
        d = s["data"]
        data = kd_data(tok, d["source"], max_length=d["max_length"], heldout_fraction=d["heldout_fraction"],
                       heldout_max=d["heldout_max"], packing=d["packing"], max_train=d["max_train"],
                       samples=d["samples"], seed=tcfg.seed)
        out = results / slug(model_name) / "retrain"
        for M in Ms:
            for method in wanted:
                row = sels[(sels["M"] == M) & (sels["method"] == method)]
                if row.empty:
                    if main:
                        print(f"[retrain] {model_name} M={M}: no selection of {method!r} in selections.csv; "
                              "skipped (run the comparison for it first)", flush=True)
                    continue
                sel = row.iloc[0].to_dict()
                removed = parse_blocks(sel["removed_blocks"])
                student, _ = _student(model_name, sel, tcfg.student_dtype)
                student.to(dev)
                if main:   # before retraining (normally already measured by the comparison harness)
                    student.eval()
                    _evaluate(student, tok, sel, cs, s, results, model_name, retrained=False, removed=None)
                run_dir = out / f"{method}_M{M}"
                t0 = time.perf_counter()
                res = distill(student, teacher, tok, data, tcfg, run_dir, accelerator=acc, progress=progress,
                              extra_provenance={"teacher": model_name, "removed_blocks": removed,
                                                "selection_method": method, "M": M,
                                                "selections": str(results / "selections.csv")})
                if main:
                    upsert_rows(results / "retraining.csv", [{
                        "model": model_name, "method": method, "M": M, "removed_blocks": format_blocks(removed),
                        "steps": res.steps, "tokens": res.tokens, "seconds": round(res.seconds, 1),
                        "processes": res.meta.get("processes", 1),
                        "heldout_kl_before": res.heldout_kl_before, "heldout_kl_after": res.heldout_kl_after,
                        "loss_first": res.losses[0] if res.losses else None,
                        "loss_last": res.losses[-1] if res.losses else None, "lr": tcfg.lr,
                        "batch_size": tcfg.batch_size, "data_source": d["source"],
                        "teacher_dtype": tcfg.teacher_dtype}], RETRAIN_COLUMNS, RETRAIN_KEY)
                    if acc is not None:   # sharded/wrapped in training: evaluate the saved folder, on this process

                        student, _ = load_model(str(run_dir), dtype=cfg["dtype"], device_map=cfg.get("device_map"))
                    student.eval()
                    _evaluate(student, tok, sel, cs, s, results, model_name, retrained=True, removed=None)
                    print(f"[retrain] {model_name} {method} M={M}: {res.tokens:,} tokens in {res.seconds:.0f} s, "
                          f"held-out KL {res.heldout_kl_before:.4f} → {res.heldout_kl_after:.4f} "
                          f"({time.perf_counter() - t0:.0f} s with evaluation)", flush=True)
                del student
        del teacher
    path = results / "retraining.md"
    if main:
        path = write_report(results, cfg["profile"], s, cs)
    return path


def _evaluate(model, tok, sel: dict, cs: dict, s: dict, results: Path, model_name: str, retrained: bool,
              removed: list[int] | None) -> None:
    """Held-out perplexity and the lm-eval tasks of the comparison harness, for one selection, unless present."""

    key = {"model": model_name, "method": sel["method"], "M": int(sel["M"]), "state": "selected"}
    ppl_texts, todo = missing_measurements(results, key, cs, retrained)
    measure_selection(model, tok, key, sel["removed_blocks"], removed, cs, results, retrained, ppl_texts,
             todo if s["evaluate_zero_shot"] else [])


def before_after_table(results: Path, tasks: Sequence[str]) -> pd.DataFrame:
    """One row per retrained (model, M, method): perplexity and zero-shot mean before → after, per-task after."""

    ev = pd.read_csv(results / "evaluations.csv")
    rt = pd.read_csv(results / "retraining.csv")
    rows = []
    for r in rt.itertuples(index=False):
        sub = ev[(ev["model"] == r.model) & (ev["method"] == r.method) & (ev["M"] == r.M)
                 & (ev["state"] == "selected")]
        out = {"model": r.model, "M": int(r.M), "method": r.method, "removed": r.removed_blocks}
        for flag, tag in ((False, "before"), (True, "after")):
            part = sub[sub["retrained"].astype(str).str.lower() == str(flag).lower()]
            ppl = part[part["task"] == "heldout_ppl"]["value"]
            out[f"ppl {tag}"] = float(ppl.iloc[0]) if len(ppl) else float("nan")
            try:
                out[f"zero-shot {tag}"] = zero_shot_mean(part.to_dict("records"), tasks)
            except ValueError:   # not every task measured (e.g. zero-shot evaluation switched off)
                out[f"zero-shot {tag}"] = float("nan")
        out["KL before"] = r.heldout_kl_before
        out["KL after"] = r.heldout_kl_after
        out["tokens"] = int(r.tokens)
        out["train s"] = r.seconds
        rows.append(out)
    return pd.DataFrame(rows).sort_values(["model", "M", "ppl after"]) if rows else pd.DataFrame(rows)


def write_report(results: Path, profile: str, s: dict, cs: dict) -> Path:

    t: DistillConfig = s["train"]
    d = s["data"]
    lines = [f"# Retraining by knowledge distillation — profile `{profile}`", "",
             f"Generated by `python -m cbo_utils.experiments.retrain --profile {profile}`. "
             "Loss: token-level KL(teacher ‖ "
             f"student), T = {t.temperature}, averaged over non-pad tokens; dense teacher; full-parameter student; "
             f"AdamW lr {t.lr}, global batch {t.batch_size}, {t.warmup_steps} warm-up steps then cosine, weight decay "
             f"{t.weight_decay}, gradient clipping {t.grad_clip}. Data: `{d['source']}` chat data, max length "
             f"{d['max_length']}, packing {d['packing']}, held-out KL on the held-out split. Evaluation as in "
             f"comparison.md: held-out perplexity on "
             + " and ".join(EVAL_TEXTS[x] for x in cs.get("ppl_texts") or ["boolq"])
             + f" ({cs['ppl_windows']} × {cs['ppl_seq_len']} each), "
             f"zero-shot mean of {', '.join(cs['tasks'])} (first {cs['limit']} items each).", ""]
    if (results / "retraining.csv").is_file() and (results / "evaluations.csv").is_file():
        tab = before_after_table(results, cs["tasks"])
        for (model, M), grp in tab.groupby(["model", "M"]):
            lines += [f"## {model}, M = {M}", "", markdown_table(grp.drop(columns=["model", "M"])), ""]
    paired = paired_table(results, n_boot=int(cs.get("bootstrap", 2000)), retrained=True)
    if len(paired):
        lines += ["## Paired comparison after retraining (held-out perplexity)", "",
                  "Ratio = a retrained model's perplexity / the best retrained baseline's on the same windows, 95 % "
                  "bootstrap interval over windows; **real** = the interval excludes 1.", ""]
        lines += paired_sections(paired, "best retrained baseline", ["method"])
    return atomic_write_text(results / "retraining.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="mini")
    ap.add_argument("--results", default=None)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--M", nargs="*", type=int, default=None)
    ap.add_argument("--methods", nargs="*", default=None)
    args = ap.parse_args(argv)
    path = run_retrain(args.profile, Path(args.results) if args.results else None, args.models, args.M,
                       args.methods)
    print(f"report: {path}")
    return 0


__all__ = ["before_after_table", "retrain_settings", "run_retrain", "write_report"]

if __name__ == "__main__":
    sys.exit(main())
