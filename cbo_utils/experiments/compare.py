"""The comparison harness: every method on the same calibration data, measured the same way.

``python -m cbo_utils.experiments.compare --profile mini`` (``make compare``) runs, for every model and M of the
profile's ``compare:`` section:

1. **select** — every baseline (:mod:`cbo_utils.select.baselines`) and every CBO variant (:data:`CBO_VARIANTS`) picks M
   blocks from the *same* calibration windows. CBO's gate gradients are collected once per kind (cached as
   ``gradients.safetensors`` + sidecar under ``results/<profile>/<model>/compare/``); variants that re-rank use the
   last ``rerank_samples`` calibration windows as their held-out part and take gradients on the others, so every
   method sees the same tokens. Each selection is a row of ``selections.csv`` with its wall-clock cost (CBO: its
   gradients + solve + re-ranking; a gradient collection shared by several variants is charged in full to each).
2. **evaluate** — held-out perplexity (BoolQ Wikipedia passages, never calibration data) and the zero-shot tasks
   through lm-evaluation-harness with a fixed item limit (the same first items for every method), on the gated
   model (α = 0 on the removed blocks, equal to physical removal; SWM on its merged model). Rows of
   ``evaluations.csv``; a measurement already in the table is not repeated, so an interrupted run resumes.
3. **correlate** — for each M and energy variant: the ``lowest`` lowest-energy states and ``random`` random
   feasible states, their held-out perplexity, Spearman ρ(energy, perplexity) → ``correlations.csv``.
4. **efficiency** — the default CBO selection of every M exported with ``save_pretrained`` (a folder plain
   ``from_pretrained`` opens) and measured against the dense model: parameters, peak memory, tokens/s.
5. **report** — ``comparison.md``: method × M × metric, and the cost and correlation tables.

Nothing is tuned on evaluation data: every CBO variant's rule (which energy, which K, which objective) is fixed in
the profile before any evaluation runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cbo_utils.calibration import EVAL_TEXTS, embedded, heldout_text, load_calibration, mixture_windows
from cbo_utils.core.artifacts import atomic_write_text, format_blocks, parse_blocks, read_json, write_json
from cbo_utils.core.profiles import check_keys, check_types, m_values, profile_with, results_dir, slug
from cbo_utils.core.tables import add_evaluations, add_selections, key_text, markdown_table, upsert_rows
from cbo_utils.evaluate.efficiency import measure_checkpoint
from cbo_utils.evaluate.lmeval import ZERO_SHOT_METRIC, evaluate_tasks, zero_shot_mean
from cbo_utils.evaluate.measure import (
    done_rows,
    evaluation_model,
    heldout_windows,
    measure_selection,
    missing_measurements,
    ppl_task,
    reuse_measurements,
)
from cbo_utils.evaluate.perplexity import WindowCache, perplexity, perplexity_windows
from cbo_utils.evaluate.statistics import paired_log_ratio, paired_mean_log_ppl
from cbo_utils.model.blocks import num_blocks
from cbo_utils.model.load import load_model
from cbo_utils.problem.ising import energies
from cbo_utils.prune.export import export_pruned
from cbo_utils.select.baselines import greedy_prefix
from cbo_utils.select.cbo import (
    CBO_VARIANTS,
    DEFAULT_VARIANT,
    get_variant,
    random_feasible_sets,
    select_cbo_variant,
    spearman,
    variant_quadratic_form,
)
from cbo_utils.select.methods import run_method
from cbo_utils.select.swm import swm_selections
from cbo_utils.solvers.states import read_states_csv, write_states_csv

# ------------------------------------------------------------------------------------------------ settings
DEFAULTS: dict[str, Any] = {
    "samples": 32, "max_tokens": 256, "rerank_samples": 8, "batch_size": 8,
    "ppl_windows": 16, "ppl_seq_len": 256, "ppl_texts": ["boolq"], "bootstrap": 2000,
    "tasks": ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande"], "limit": 100, "task_source": "offline",
    "baselines": ["block_influence", "block_influence_iterative", "norm_ratio", "angular_distance", "tail",
                  "one_shot_perplexity", "taylor_plus", "sleb", "sliding_window_merging"],
    "random_seeds": [0, 1, 2],
    "variants": list(CBO_VARIANTS), "default": DEFAULT_VARIANT, "exact_hessian_samples": 0,
    "points_per_sample": 2, "pair_table": "screened", "screen_margin": 4,
    "spearman": {"lowest": 30, "random": 20, "variants": ["cbo-paper", "cbo-taylor", "cbo-sd"], "ppl_windows": 8,
                 "zero_shot": None},
    "zero_shot_methods": "all",
    "dev_windows": 16, "dev_source": "mix", "dev_prefer": None, "finalist_baselines": 3,
    "threads": None, "models": None, "M_values": None,
}


#: the type of each ``compare:`` setting (:func:`cbo_utils.core.profiles.check_types`)
TYPES = {"samples": "posint", "max_tokens": "posint|none", "rerank_samples": "posint", "batch_size": "posint",
         "ppl_windows": "posint", "ppl_seq_len": "posint", "ppl_texts": "list[str]", "bootstrap": "posint",
         "tasks": "list[str]", "limit": "posint|none", "task_source": "str", "baselines": "list[str]",
         "random_seeds": "list[int]", "variants": "list[str]", "default": "str", "exact_hessian_samples": "nonnegint",
         "points_per_sample": "posint", "pair_table": "str", "screen_margin": "nonnegint", "spearman": "dict",
         "zero_shot_methods": "str|list[str]",
         "dev_windows": "posint", "dev_source": "str", "dev_prefer": "str|none",
         "finalist_baselines": "nonnegint", "threads": "posint|none",
         "models": "list[str]|none", "M_values": "list[posint]|none"}


def compare_settings(cfg: dict) -> dict:
    """The profile's ``compare:`` section over :data:`DEFAULTS`, validated (unknown keys and wrong types are
    errors)."""
    given = cfg.get("compare") or {}
    if not isinstance(given, dict):
        raise ValueError(f"compare: must be a mapping of settings, got {given!r}")
    given = dict(given)
    check_keys("compare", given, DEFAULTS)
    check_types("compare", given, TYPES)
    s = {**DEFAULTS, **given}
    check_keys("compare.spearman", s.get("spearman") or {}, DEFAULTS["spearman"])
    s["spearman"] = {**DEFAULTS["spearman"], **(s.get("spearman") or {})}
    if s["spearman"]["zero_shot"] is not None:
        check_keys("compare.spearman.zero_shot", s["spearman"]["zero_shot"], ("tasks", "limit", "M"))
    unknown = [v for v in s["variants"] if v not in CBO_VARIANTS]
    if unknown:
        raise ValueError(f"unknown CBO variants {unknown} in the profile; choose from {sorted(CBO_VARIANTS)}")
    if s["default"] != "dev" and s["default"] not in s["variants"]:
        raise ValueError(f"the default variant {s['default']!r} must be one of the profile's variants, or 'dev' (the "
                         "variant with the lowest development perplexity, chosen by the develop stage)")
    if s["dev_source"] not in DEV_SOURCES:
        raise ValueError(f"compare.dev_source {s['dev_source']!r} is not a development source; choose one of "
                         f"{sorted(DEV_SOURCES)}")
    if s["dev_prefer"] is not None and s["dev_prefer"] not in s["variants"]:
        raise ValueError(f"compare.dev_prefer {s['dev_prefer']!r} must be one of the profile's variants "
                         f"{s['variants']} (the variant a tied development vote takes), or null")
    zs = s["zero_shot_methods"]
    if not (zs in ("all", "finalists") or isinstance(zs, list)):
        raise ValueError(f"compare.zero_shot_methods must be 'all', 'finalists' or a list of methods, got {zs!r}")
    if not 0 < s["rerank_samples"] < s["samples"]:
        raise ValueError("rerank_samples must be between 1 and samples − 1 (the held-out part of the calibration)")
    return s


#: methods whose answer for the largest M contains every smaller M's (greedy paths, one-shot rankings): run once
#: per model (:func:`greedy_prefix`; the equality is tested)
GREEDY_PATHS = ("sleb", "block_influence_iterative", "one_shot_perplexity")


def _select_baseline(model, calib, name: str, M: int, s: dict, seed: int | None = None, paths: dict | None = None,
                     M_max: int | None = None, Ms: Sequence[int] | None = None) -> dict:

    kw: dict[str, Any] = {"seed": seed} if name == "random" else {}
    if name not in ("random", "tail"):
        kw["batch_size"] = s["batch_size"]
    if name == "sliding_window_merging" and paths is not None and Ms:
        # one evaluator (calibration forward, prefix cache, memo of merged models) for this and every larger M:
        # the same answers as one call per M (swm_selections), without re-scoring the merged models they share
        done = paths.setdefault(name, {})
        if M not in done:
            done.update(swm_selections(model, calib, [m for m in sorted(Ms) if m >= M], **kw))
        sel = done[M]
    elif name in GREEDY_PATHS and paths is not None and M_max:
        if name not in paths or paths[name].M < M:
            paths[name] = run_method(name, model, calib, max(M, M_max), **kw)
        sel = greedy_prefix(paths[name], M)
    else:
        sel = run_method(name, model, calib, M, **kw)
    return {"removed": sel.removed, "energy": None, "selection_seconds": sel.seconds, "selection": sel,
            "relative": " ".join(map(str, sel.relative)) if sel.relative else "",
            "detail": json.dumps({k: v for k, v in sel.meta.items() if k in ("prefix_cache", "threshold",
                                                                             "block_calls", "windows", "path_of")},
                                 default=str)}


#: the comparison's stages, in the order they run
STAGES = ("select", "develop", "evaluate", "correlate", "efficiency", "report")


def run_compare(profile: str, results: Path | None = None, models: Sequence[str] | None = None,
                M_values: Sequence[int] | None = None, stages: Sequence[str] = ("select", "develop", "evaluate",
                                                                                  "correlate", "efficiency", "report"),
                progress: bool = True, compare: dict | None = None) -> Path:
    """Run the comparison for ``profile`` into ``results/<profile>/``; returns the report path. ``compare``: the
    profile's ``compare:`` section to use instead of the file's (the notebooks pass their parameter)."""
    unknown = [st for st in stages if st not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {' '.join(STAGES)}")
    cfg = profile_with(profile, "compare", compare)
    s = compare_settings(cfg)
    if s["threads"]:
        torch.set_num_threads(int(s["threads"]))
    results = results_dir(cfg, results, create=False)   # refused before any work when it is not cbo's
    seed = int(cfg.get("seed", 0))
    for model_name in models or s.get("models") or cfg["models"]:
        model, tok = load_model(model_name, dtype=cfg["dtype"], device_map=cfg.get("device_map"))
        model.eval()
        Ms = list(M_values or s.get("M_values") or m_values(cfg, model_name))
        n_blocks = num_blocks(model)
        bad = [M for M in Ms if isinstance(M, bool) or not isinstance(M, int) or not 1 <= M < n_blocks]
        if not Ms or bad:
            raise ValueError(f"M {bad or Ms}: {model_name} has {n_blocks} blocks, so each M must be a whole number "
                             f"from 1 to {n_blocks - 1}; nothing was computed")
        results = results_dir(cfg, results)
        out = results / slug(model_name) / "compare"
        out.mkdir(parents=True, exist_ok=True)
        calib = load_calibration(cfg["calibration"], tok, samples=s["samples"], max_tokens=s["max_tokens"])
        n_fit = s["samples"] - s["rerank_samples"]
        fit = type(calib)(calib.samples[:n_fit], {**calib.recipe, "part": f"windows 0..{n_fit - 1} (gradients)"})
        heldout = type(calib)(calib.samples[n_fit:], {**calib.recipe,
                                                      "part": f"windows {n_fit}..{len(calib) - 1} (re-ranking)"})
        base = {"model": model_name, "calibration_tokens": calib.tokens, "calibration_sha256": calib.sha256}
        if "select" in stages:
            paths: dict = {}  # SLEB's greedy path (once, for the largest M) and SWM's shared evaluator
            for M in sorted(Ms):
                _run_selections(model, calib, fit, heldout, out, M, s, seed, base, results, progress,
                                paths=paths, M_max=max(Ms), Ms=Ms)
        sels = done_rows(results / "selections.csv", model=model_name)
        if "develop" in stages:
            _run_development(model, tok, sels[sels["M"].isin(Ms)], s, results, model_name, progress)
        if "evaluate" in stages:
            _run_evaluations(model, tok, sels[sels["M"].isin(Ms)], s, results, model_name, progress)
        if "correlate" in stages:
            _run_correlations(model, tok, out, Ms, s, results, model_name, progress)
        if "efficiency" in stages:
            _run_efficiency(model, tok, sels[sels["M"].isin(Ms)], s, results, out, model_name)
        del model
    path = results / "comparison.md"
    if "report" in stages:
        path = write_report(results, cfg["profile"], s, cfg.get("calibration", ""))
    return path


def _run_selections(model, calib, fit, heldout, out, M, s, seed, base, results, progress, paths=None,
                    M_max=None, Ms=None) -> None:

    table = results / "selections.csv"
    jobs: list[tuple[str, Any]] = [(b, None) for b in s["baselines"]]
    jobs += [("random", sd) for sd in s["random_seeds"]]
    jobs += [(v, "cbo") for v in s["variants"]]
    for name, arg in jobs:
        seed_col = arg if name == "random" else seed
        prev = done_rows(table, model=base["model"], method=name, M=M, seed=seed_col)
        if len(prev) and str(prev.iloc[0].get("calibration_sha256")) == base["calibration_sha256"]:
            continue
        if arg == "cbo":
            v = get_variant(name)
            if v.hessian == "exact" and not s["exact_hessian_samples"]:
                print(f"  [{base['model']}] M={M} {name}: skipped (compare.exact_hessian_samples is 0)")
                continue
            sel = select_cbo_variant(model, calib, heldout, fit, out, v, M, s, seed)
            r = {"removed": sel.removed, "energy": sel.energy, "selection_seconds": sel.seconds, **sel.meta,
                 "states": sel.states}
            if r.get("states") is not None:
                write_states_csv(r["states"], out / f"states_{name}_M{M}.csv")
            tokens = calib.tokens
        else:
            try:
                r = _select_baseline(model, calib, name, M, s, arg, paths=paths, M_max=M_max, Ms=Ms)
            except ValueError as exc:  # a method that does not apply to this model/M (e.g. Taylor+ on 6 blocks)
                _note_skipped(results, base["model"], name, M, str(exc))
                print(f"  [{base['model']}] M={M} {name}: not applicable — {exc}")
                continue
            tokens = calib.tokens if name not in ("random", "tail") else 0
        row = {**base, "method": name, "M": M, "removed_blocks": format_blocks(r["removed"]),
               "energy": r.get("energy"), "selection_seconds": round(float(r["selection_seconds"]), 3),
               "calibration_tokens": tokens, "seed": seed_col, "relative_blocks": r.get("relative", ""),
               "gradient_seconds": r.get("gradient_seconds"), "solve_seconds": r.get("solve_seconds"),
               "rerank_seconds": r.get("rerank_seconds"), "gradients_file": r.get("gradients_file", ""),
               "detail": r.get("detail", "")}
        add_selections(results, [row])
        if progress:
            print(f"  [{base['model']}] select M={M} {name:28s} {row['removed_blocks']:40s} "
                  f"{row['selection_seconds']:8.1f} s",
                  flush=True)


def _note_skipped(results: Path, model: str, method: str, M: int, reason: str) -> None:
    path = results / "skipped.json"
    notes = read_json(path) if path.is_file() else []
    notes = [n for n in notes if (n["model"], n["method"], n["M"]) != (model, method, M)]
    write_json(path, notes + [{"model": model, "method": method, "M": M, "reason": reason}])


def _state_label(row) -> str:
    return f"seed{int(row['seed'])}" if row["method"] == "random" else "selected"


DEVELOPMENT_FILE = "development.json"
DEVELOPMENT_WINDOWS = "development_windows.csv"
#: the development sources: name → what it is (``compare.dev_source``)
DEV_SOURCES = {"mix": "the development mixture (DROP prose, CoQA/Gutenberg literature, MATH, HumanEval): neither "
                      "calibration nor test", "sciq": "SciQ held-out pool (the calibration's own domain)"}


def dev_task(s: dict) -> str:
    """The evaluations-table task of the development perplexity (``dev_ppl_mix``, ``dev_ppl_sciq``)."""
    return f"dev_ppl_{s['dev_source']}"


def _dev_windows(tok, s: dict) -> torch.Tensor:
    if s["dev_source"] == "mix":
        return mixture_windows(tok, "dev", s["dev_windows"], s["ppl_seq_len"])
    dev = embedded(tok, samples=s["dev_windows"], max_tokens=s["ppl_seq_len"], split="heldout")
    return torch.stack([smp["input_ids"] for smp in dev.samples])


def _run_development(model, tok, sels: pd.DataFrame, s: dict, results: Path, model_name: str, progress) -> None:
    """Development data, never test data: the perplexity of every selection on the development windows
    (``dev_source``: by default the development mixture, a source that is neither calibration nor test), each
    window's NLL kept (``development_windows.csv``), then the rules fixed in the profile — the default CBO variant
    (:func:`development_rule`) and the zero-shot finalists (dense, the ``finalist_baselines`` baselines of lowest
    development perplexity at each M, and the default) — written to ``development.json`` before any test
    evaluation."""
    task = dev_task(s)
    windows = WindowCache(model, _dev_windows(tok, s))   # every removal from the dense prefix it shares
    wtable = results / DEVELOPMENT_WINDOWS
    rows = [{"method": "dense", "M": 0, "removed_blocks": "", "seed": 0}] + sels.to_dict("records")
    for row in rows:
        label = "selected" if row["method"] == "dense" else _state_label(row)
        key = {"model": model_name, "method": row["method"], "M": int(row["M"]), "state": label}
        blocks = row.get("removed_blocks", "") if row["method"] != "dense" else ""
        if len(done_rows(results / "evaluations.csv", **key, retrained=False, task=task)):
            continue
        same = done_rows(wtable, model=model_name, M=int(row["M"]), task=task)
        same = same[same["removed_blocks"].map(key_text) == key_text(blocks)] if len(same) else same
        if len(same) >= len(windows):   # another method removed the same blocks: its windows are this one's
            nll = same.sort_values("window")["nll"].astype(float).tolist()[:len(windows)]
            tok_w = int(same["tokens"].iloc[0])
        else:
            m, removed = evaluation_model(model, row) if row["method"] != "dense" else (model, None)
            p = perplexity(m, windows, removed=removed or None)
            nll, tok_w = p["window_nll"], p["window_tokens"]
            upsert_rows(wtable, [{"model": model_name, "M": int(row["M"]), "removed_blocks": blocks, "task": task,
                                  "window": i, "nll": v, "tokens": tok_w} for i, v in enumerate(nll)],
                        ["model", "M", "removed_blocks", "task", "window", "nll", "tokens"],
                        ["model", "M", "removed_blocks", "task", "window"], float_format="%.17g")
            del m
        add_evaluations(results, [{**key, "retrained": False, "removed_blocks": blocks, "task": task,
                                   "metric": "perplexity", "value": math.exp(sum(nll) / (tok_w * len(nll))),
                                   "stderr": None, "n": tok_w * len(nll), "limit": None, "lm_eval_version": None,
                                   "split": DEV_SOURCES[s["dev_source"]]}])
    ev = done_rows(results / "evaluations.csv", model=model_name, retrained=False, task=task)
    ev = ev[ev["state"] == "selected"]
    logp = ev.assign(lp=np.log(ev["value"].astype(float))).groupby(["method", "M"])["lp"].mean()
    rule = development_rule(results, model_name, sels, s)
    default = rule["default"]
    finalists = {}
    for M in sorted({int(m) for _, m in logp.index if int(m) > 0}):
        base = {m: float(v) for (m, mm), v in logp.items() if int(mm) == M and not str(m).startswith("cbo")
                and m != "dense"}
        finalists[str(M)] = sorted(base, key=base.get)[:s["finalist_baselines"]] + [default]
    path = results / DEVELOPMENT_FILE
    rec = read_json(path) if path.is_file() else {}
    rec.setdefault("default", {})[model_name] = default
    rec.setdefault("dev_log_ppl", {})[model_name] = rule["scores"]
    rec.setdefault("vote", {})[model_name] = {k: v for k, v in rule.items() if k not in ("default", "scores")}
    rec.setdefault("finalists", {})[model_name] = finalists
    rec["source"] = DEV_SOURCES[s["dev_source"]]
    rec["rule"] = (f"default: the CBO variant with the lowest mean over M of log perplexity on the development "
                   f"windows ({s['dev_windows']} × {s['ppl_seq_len']} tokens, {s['dev_source']})"
                   + (f"; when the interval of its lead over {s['dev_prefer']} (paired bootstrap over the windows, "
                      f"95 %, {s['bootstrap']} draws) includes 0, the vote is a tie and {s['dev_prefer']} (it "
                      "measures real M-sets) is taken" if s["dev_prefer"] else "")
                   + f"; finalists: the {s['finalist_baselines']} baselines of lowest development perplexity at "
                     "each M, and the default")
    write_json(path, rec)
    if progress:
        print(f"  [{model_name}] development: default {default} ({rule['reason']}); finalists {finalists}",
              flush=True)


def development_rule(results: Path, model_name: str, sels: pd.DataFrame, s: dict) -> dict:
    """The default CBO variant by the profile's rule, from the development windows: each variant's score is the mean
    over M of its log development perplexity; ``default: dev`` takes the lowest, except that with ``dev_prefer``
    set, a lead over ``dev_prefer`` whose paired 95 % bootstrap interval (over windows, :func:`paired_mean_log_ppl`)
    includes 0 is a tie and ``dev_prefer`` is taken. Returns ``default``, ``scores``, ``best``, ``reason`` and (when
    the preference was weighed) ``lead`` — the best's score minus the preferred one's, with its interval."""
    task = dev_task(s)
    w = done_rows(results / DEVELOPMENT_WINDOWS, model=model_name, task=task)
    Ms = sorted({int(m) for m in sels["M"]})
    mats: dict[str, np.ndarray] = {}
    tokens = None
    for v in s["variants"]:
        cols = []
        for M in Ms:
            r = sels[(sels["method"] == v) & (sels["M"] == M)]
            if not len(r) or not len(w):
                break
            sub = w[(w["M"] == M) & (w["removed_blocks"].map(key_text) == key_text(r["removed_blocks"].iloc[0]))]
            if not len(sub):
                break
            sub = sub.sort_values("window")
            cols.append(sub["nll"].astype(float).to_numpy())
            tokens = float(sub["tokens"].iloc[0])
        if len(cols) == len(Ms) and len({len(c) for c in cols}) == 1:
            mats[v] = np.stack(cols, axis=1)
    if s["default"] != "dev":
        return {"default": s["default"], "scores": {}, "best": None, "reason": "fixed in the profile"}
    if not mats:
        raise ValueError("no CBO variant has development measurements at every M: run the select and develop stages")
    scores = {v: float((a.sum(0) / (tokens * a.shape[0])).mean()) for v, a in mats.items()}
    best = min(scores, key=scores.get)
    out = {"scores": scores, "best": best, "default": best, "reason": "lowest development score"}
    prefer = s.get("dev_prefer")
    if prefer and prefer != best and prefer in mats:
        lead = paired_mean_log_ppl(mats[best], mats[prefer], tokens, n_boot=int(s["bootstrap"]))
        out["lead"] = {"over": prefer, "difference": lead["difference"], "lo": lead["lo"], "hi": lead["hi"],
                       "windows": lead["windows"]}
        if not lead["separated"]:
            out.update(default=prefer, reason=f"tie: {best}'s lead {lead['difference']:+.4f} "
                                              f"[{lead['lo']:+.4f}, {lead['hi']:+.4f}] includes 0, so {prefer}")
        else:
            out["reason"] = (f"lowest development score; its lead over {prefer} {lead['difference']:+.4f} "
                             f"[{lead['lo']:+.4f}, {lead['hi']:+.4f}] is real")
    elif prefer and prefer == best:
        out["reason"] = f"lowest development score (it is also the preferred {prefer})"
    return out


def default_variant(results: Path, s: dict, model: str | None = None) -> str:
    """The default CBO variant of the run: the profile's, or (``default: dev``) the one the develop stage chose."""
    if s["default"] != "dev":
        return s["default"]
    path = results / DEVELOPMENT_FILE
    chosen = read_json(path).get("default", {}) if path.is_file() else {}
    if model is not None and model in chosen:
        return chosen[model]
    return ", ".join(sorted(set(chosen.values()))) or "dev (not chosen yet: run the develop stage)"


def _run_evaluations(model, tok, sels: pd.DataFrame, s: dict, results: Path, model_name: str, progress) -> None:

    windows = {t: WindowCache(model, w) for t, w in heldout_windows(tok, s).items()}   # see WindowCache
    rows = [{"method": "dense", "M": 0, "removed_blocks": "", "seed": 0}] + sels.to_dict("records")
    for row in rows:
        label = "selected" if row["method"] == "dense" else _state_label(row)
        key = {"model": model_name, "method": row["method"], "M": int(row["M"]), "state": label}
        ppl_texts, todo = missing_measurements(results, key, s, retrained=False)
        zs = s["zero_shot_methods"]
        if zs == "finalists":
            zs = (read_json(results / DEVELOPMENT_FILE).get("finalists", {}).get(model_name, {}).get(str(row["M"]), [])
                  if (results / DEVELOPMENT_FILE).is_file() else [])
        if zs != "all" and row["method"] not in set(zs) | {"dense"}:
            todo = []
        if row["method"] != "dense" and (ppl_texts or todo):   # the same blocks removed by another method: copy
            left = reuse_measurements(results, key, row.get("removed_blocks", ""), False,
                                      [ppl_task(t) for t in ppl_texts] + list(todo), s["limit"])
            ppl_texts, todo = [t for t in ppl_texts if ppl_task(t) in left], [t for t in todo if t in left]
        if not ppl_texts and not todo:
            continue  # resuming: nothing left to measure (and no SWM copy to build)
        m, removed = evaluation_model(model, row) if row["method"] != "dense" else (model, None)
        measure_selection(m, tok, key, row.get("removed_blocks", ""), removed, s, results, False, ppl_texts, todo,
                          windows)
        if progress:
            print(f"  [{model_name}] evaluated {row['method']} M={row['M']} {label}", flush=True)
        del m


def _run_correlations(model, tok, out: Path, Ms, s, results: Path, model_name: str, progress) -> None:
    """Spearman ρ(energy, log held-out perplexity) per M and energy variant over the variant's ``lowest`` states and
    ``random`` random feasible states (the same random states for every variant of one M). Perplexities are cached
    per state in ``state_perplexities.csv`` (a state shared by two variants is measured once)."""

    sp = s["spearman"]
    windows = WindowCache(model, perplexity_windows(tok, heldout_text(), seq_len=s["ppl_seq_len"],
                                                    windows=sp["ppl_windows"]))
    ppl_table = results / "state_perplexities.csv"
    ppl_cols = ["model", "M", "removed_blocks", "perplexity", "windows", "seq_len"]
    ppl_key = ["model", "M", "removed_blocks"]
    corr_rows, energy_rows = [], []
    zs = sp.get("zero_shot")  # None, or {tasks: [...], limit: n, M: [..]}: also the zero-shot mean of every state
    for M in Ms:
        zs_M = bool(zs) and (not zs.get("M") or M in zs["M"])  # zero-shot per state at this M?
        done = done_rows(ppl_table, model=model_name, M=M)
        have = {r["removed_blocks"]: r for r in done.to_dict("records")}
        for name in sp["variants"]:
            f = out / f"states_{name}_M{M}.csv"
            sel = done_rows(results / "selections.csv", model=model_name, method=name, M=M)
            if not f.is_file() or not len(sel):
                continue
            v = get_variant(name)
            states = read_states_csv(f).head(sp["lowest"])
            Q, const = variant_quadratic_form(v, out / sel["gradients_file"].iloc[0], M=M)
            N = Q.shape[0]
            rand = random_feasible_sets(N, M, sp["random"], seed=1000 + M)
            X = np.zeros((len(rand), N))
            for j, r in enumerate(rand):
                X[j, r] = 1
            cand = [("lowest", int(r["rank"]), r["removed_blocks"], float(r["energy"])) for _, r in states.iterrows()]
            cand += [("random", j, format_blocks(r), float(e)) for j, (r, e) in enumerate(zip(rand, energies(Q, X,
                                                                                                            const)))]
            new = []
            for _kind, _rank, blocks, _e in cand:
                rec = have.get(blocks)
                need_zs = zs_M and (rec is None or pd.isna(rec.get("zero_shot_mean", np.nan)))
                if rec is not None and not need_zs:
                    continue
                if rec is None:
                    ppl = perplexity(model, windows, removed=parse_blocks(blocks))["perplexity"]
                    rec = {"model": model_name, "M": M, "removed_blocks": blocks, "windows": sp["ppl_windows"],
                           "seq_len": s["ppl_seq_len"], "perplexity": ppl}
                rec = dict(rec)
                if need_zs:
                    rows = evaluate_tasks(model, tok, zs["tasks"], limit=zs.get("limit"), removed=parse_blocks(blocks),
                                          source=s["task_source"])
                    rec.update(zero_shot_mean=zero_shot_mean(rows, zs["tasks"]), zero_shot_limit=zs.get("limit"),
                               zero_shot_tasks=" ".join(zs["tasks"]))
                have[blocks] = rec
                new.append(rec)
                if len(new) >= 10:  # keep what was measured if the run is interrupted
                    upsert_rows(ppl_table, new, ppl_cols, ppl_key)
                    new = []
            if new:
                upsert_rows(ppl_table, new, ppl_cols, ppl_key)
            energy_rows += [{"model": model_name, "variant": name, "M": M, "kind": k, "rank": r, "removed_blocks": b,
                             "energy": e, "perplexity": have[b]["perplexity"],
                             "zero_shot_mean": have[b].get("zero_shot_mean")} for k, r, b, e in cand]
            es = np.array([c[3] for c in cand])
            lp = np.log(np.array([float(have[c[2]]["perplexity"]) for c in cand]))
            nl = len(states)
            row = {"model": model_name, "variant": name, "M": M, "states": len(cand), "lowest": nl,
                   "random": len(cand) - nl, "spearman_all": spearman(es, lp),
                   "spearman_lowest": spearman(es[:nl], lp[:nl]) if nl > 2 else float("nan"),
                   "spearman_random": spearman(es[nl:], lp[nl:]) if len(cand) - nl > 2 else float("nan")}
            if zs_M:  # higher accuracy is better: a good energy has a NEGATIVE ρ with accuracy
                acc = np.array([float(have[c[2]]["zero_shot_mean"]) for c in cand])
                row["spearman_zero_shot"] = spearman(es, acc)
            corr_rows.append(row)
            if progress:
                print(f"  [{model_name}] M={M} {name}: Spearman ρ(energy, log ppl) = "
                      f"{row['spearman_all']:.3f} over {len(cand)} states", flush=True)
    if energy_rows:
        upsert_rows(results / "state_energies.csv", energy_rows, list(energy_rows[0]),
                    ["model", "variant", "M", "kind", "removed_blocks"])
    if corr_rows:
        upsert_rows(results / "correlations.csv", corr_rows, list(corr_rows[0]), ["model", "variant", "M"])


def _run_efficiency(model, tok, sels: pd.DataFrame, s, results: Path, out: Path, model_name: str) -> None:
    import copy


    table = results / "evaluations.csv"
    dense_dir = out / "dense"
    todo = [("dense", 0, None, dense_dir)]
    default = default_variant(results, s, model_name)
    for _, r in sels[sels["method"] == default].iterrows():
        todo.append((default, int(r["M"]), parse_blocks(r["removed_blocks"]), out / f"pruned_M{int(r['M'])}"))
    for method, M, removed, folder in todo:
        if len(done_rows(table, model=model_name, method=method, M=M, state="selected", task="efficiency")):
            continue
        if removed is None:
            if not (folder / "config.json").is_file():
                model.save_pretrained(folder)
                tok.save_pretrained(folder)
        else:
            export_pruned(copy.deepcopy(model), tok, removed, folder, method=method, source=model_name,
                          overwrite=True)
        m = measure_checkpoint(folder, threads=s["threads"])
        add_evaluations(results, [{"model": model_name, "method": method, "M": M, "state": "selected",
                                   "task": "efficiency", "metric": k, "value": m[k], "stderr": None, "n": None,
                                   "limit": None, "retrained": False, "lm_eval_version": None,
                                   "removed_blocks": format_blocks(removed or []),
                                   "detail": f"prompt {m['prompt_len']}, generate {m['gen_len']}, "
                                             f"{m['threads']} threads, CPU float32"}
                                  for k in ("parameters", "peak_rss_gb", "prefill_tokens_per_s",
                                            "generate_tokens_per_s")])


# -------------------------------------------------------------------------------------------------- report
def _zero_shot_rows(ev: pd.DataFrame, tasks: Sequence[str], limit) -> pd.DataFrame:
    """The rows of ``ev`` that are not zero-shot results of another item limit (a run with a new ``limit`` keeps the
    old rows in the table; only the current limit's are reported)."""
    if limit is None or "limit" not in ev.columns:
        return ev
    other = ev["task"].isin(list(tasks)) & (ev["limit"].map(key_text) != key_text(limit))
    return ev[~other]


def comparison_table(results: Path, metric_tasks: Sequence[str], limit=None) -> pd.DataFrame:
    """Method × M: held-out perplexity, each task's accuracy (acc_norm for hellaswag/arc_challenge), the zero-shot
    mean, selection seconds. Random seeds are averaged (``random (mean of n)``). ``limit``: report the zero-shot
    rows of this item limit only."""

    ev = pd.read_csv(results / "evaluations.csv")
    ev = ev[~ev["retrained"].astype(str).str.lower().eq("true")]
    ev = _zero_shot_rows(ev, metric_tasks, limit)
    sel = pd.read_csv(results / "selections.csv") if (results / "selections.csv").is_file() else pd.DataFrame()
    recs = []
    for (model, method, M), grp in ev.groupby(["model", "method", "M"]):
        rec: dict[str, Any] = {"model": model, "method": method, "M": int(M)}
        for task in sorted(t for t in grp["task"].unique() if str(t).startswith("heldout_ppl")) or ["heldout_ppl"]:
            ppl = grp[(grp["task"] == task)]["value"]
            rec[task] = float(np.exp(np.log(ppl.astype(float)).mean())) if len(ppl) else np.nan
        accs = []
        for t in metric_tasks:
            mt = ZERO_SHOT_METRIC.get(t, "acc")
            v = grp[(grp["task"] == t) & (grp["metric"] == mt)]["value"].astype(float)
            rec[f"{t}/{mt}"] = float(v.mean()) if len(v) else np.nan
            accs.append(rec[f"{t}/{mt}"])
        rec["zero_shot_mean"] = float(np.mean(accs)) if accs and not np.isnan(accs).any() else np.nan
        if len(sel):
            ss = sel[(sel["model"] == model) & (sel["method"] == method) & (sel["M"] == M)]
            rec["removed_blocks"] = ss["removed_blocks"].iloc[0] if len(ss) == 1 else (
                f"{len(ss)} seeds" if len(ss) else "")
            rec["selection_seconds"] = float(ss["selection_seconds"].mean()) if len(ss) else np.nan
        recs.append(rec)
    return pd.DataFrame(recs).sort_values(["model", "M", "heldout_ppl"]).reset_index(drop=True)


def zero_shot_table(results: Path, tasks: Sequence[str], limit=None) -> pd.DataFrame:
    """The methods with every zero-shot task measured (at ``limit`` items), per model and M: each task's accuracy ±
    its standard error (lm-eval's), the unweighted mean ± its standard error (√Σse² / n, the tasks' items being
    independent) and the difference of the mean to the best baseline's in standard errors of that difference."""

    ev = pd.read_csv(results / "evaluations.csv")
    ev = ev[~ev["retrained"].astype(str).str.lower().eq("true") & ev["task"].isin(list(tasks))]
    ev = _zero_shot_rows(ev, tasks, limit)
    recs = []
    for (model, method, M, state), grp in ev.groupby(["model", "method", "M", "state"]):
        rec: dict[str, Any] = {"model": model, "M": int(M), "method": method if state == "selected"
                               else f"{method} ({state})"}
        vals, ses = [], []
        for t in tasks:
            mt = ZERO_SHOT_METRIC.get(t, "acc")
            r = grp[(grp["task"] == t) & (grp["metric"] == mt)]
            if len(r) != 1:
                break
            v, se = float(r["value"].iloc[0]), float(r["stderr"].iloc[0])
            rec[f"{t}/{mt}"] = f"{v:.3f} ± {se:.3f}"
            vals.append(v)
            ses.append(se)
        else:
            rec["items"] = int(grp["n"].astype(float).min())
            rec["mean"], rec["se"] = float(np.mean(vals)), float(math.sqrt(sum(x * x for x in ses)) / len(ses))
            recs.append(rec)
    if not recs:
        return pd.DataFrame()
    tab = pd.DataFrame(recs)
    out = []
    for (_, M), grp in tab.groupby(["model", "M"]):
        base = grp[~grp["method"].str.startswith(("cbo", "dense", "random"))]
        grp = grp.copy()
        if len(base) and M > 0:
            b = base.loc[base["mean"].idxmax()]
            grp["vs_best_baseline"] = [f"{m - b['mean']:+.3f} ({(m - b['mean']) / math.hypot(se, b['se']):+.1f} SE)"
                                       if meth != b["method"] else "best baseline"
                                       for m, se, meth in zip(grp["mean"], grp["se"], grp["method"])]
        out.append(grp.sort_values("mean", ascending=False))
    return pd.concat(out).reset_index(drop=True)


def paired_table(results: Path, n_boot: int = 2000, seed: int = 0, retrained: bool = False) -> pd.DataFrame:
    """For every model, held-out text and M: each method's perplexity ratio to the best baseline on that text (the
    lowest perplexity among the non-CBO, non-random methods) with a 95 % paired bootstrap interval over the windows
    (:func:`cbo_utils.evaluate.statistics.paired_log_ratio`); ``separated``: the interval excludes 1.
    ``retrained=True``: the same among the retrained models (the best *retrained* baseline as reference)."""
    path = results / "window_nll.csv"
    if not path.is_file():
        return pd.DataFrame()
    w = pd.read_csv(path)
    w = w[w["retrained"].astype(str).str.lower().eq("true").eq(bool(retrained)) & (w["M"] > 0)]
    rows = []
    for (model, task, M), grp in w.groupby(["model", "task", "M"]):
        per = {k: sub.sort_values("window") for k, sub in grp.groupby(["method", "state"])}
        mean = {k: float(sub["nll"].sum() / sub["tokens"].sum()) for k, sub in per.items()}
        baselines = [k for k in per if not str(k[0]).startswith("cbo") and k[0] != "random"]
        if not baselines:
            continue
        best = min(baselines, key=mean.get)
        for k, sub in per.items():
            both = sub.merge(per[best], on="window", suffixes=("", "_ref"))
            r = paired_log_ratio(both["nll"], both["nll_ref"], both["tokens"], n_boot=n_boot, seed=seed)
            rows.append({"model": model, "task": task, "M": int(M), "method": k[0], "state": k[1],
                         "perplexity": math.exp(mean[k]), "best_baseline": best[0], "ratio": r["ratio"],
                         "ratio_lo": r["ratio_lo"], "ratio_hi": r["ratio_hi"], "separated": r["separated"],
                         "windows": r["windows"]})
    return pd.DataFrame(rows).sort_values(["model", "task", "M", "perplexity"]).reset_index(drop=True) \
        if rows else pd.DataFrame()


def dev_test_agreement(results: Path, max_ppl: float = 1e3, s: dict | None = None) -> pd.DataFrame:
    """How well the development data predicts the test texts: per model and M, Spearman ρ across methods between
    the log development perplexity and each held-out text's log perplexity (selections without retraining; methods
    whose development perplexity exceeds ``max_ppl`` are left out, so the broken ones do not make ρ look good), and
    which method each ranks first. A ρ well below 1 says the development rule picks for the calibration's domain,
    not for the test texts'."""
    path = results / "evaluations.csv"
    if not path.is_file():
        return pd.DataFrame()
    ev = pd.read_csv(path)
    ev = ev[~ev["retrained"].astype(str).str.lower().eq("true") & (ev["M"] > 0)]
    texts = sorted(t for t in ev["task"].astype(str).unique() if t.startswith("heldout_ppl"))
    dev = dev_task(s) if s else next((t for t in sorted(ev["task"].astype(str).unique()) if t.startswith("dev_ppl")),
                                     "dev_ppl_sciq")
    piv = ev[ev["task"].isin([dev, *texts])].pivot_table(
        index=["model", "M", "method"], columns="task", values="value", aggfunc="first")
    if dev not in piv or not texts:
        return pd.DataFrame()
    rows = []
    for (model, M), grp in piv.groupby(level=["model", "M"]):
        g = grp.droplevel(["model", "M"])
        g = g[g[dev] <= max_ppl].dropna()
        if len(g) < 3:
            continue
        row = {"model": model, "M": int(M), "methods": len(g), "best_on_dev": g[dev].idxmin()}
        for t in texts:
            row[f"rho_{t}"] = spearman(np.log(g[dev].to_numpy()), np.log(g[t].to_numpy()))
            row[f"best_on_{t}"] = g[t].idxmin()
        rows.append(row)
    return pd.DataFrame(rows)


def paired_sections(paired: pd.DataFrame, reference: str, columns: Sequence[str]) -> list[str]:
    """Markdown lines of a :func:`paired_table`: one table per (model, text, M) with the ratio, its interval and
    **real** where the interval excludes 1; ``reference`` names the reference in each heading."""
    lines: list[str] = []
    for (model, task, M), grp in paired.groupby(["model", "task", "M"], sort=False):
        g = grp.assign(interval=[f"{lo:.3f}–{hi:.3f}" for lo, hi in zip(grp["ratio_lo"], grp["ratio_hi"])],
                       real=grp["separated"].map({True: "**real**", False: ""}))
        lines += [f"### {model}, {task}, M = {M} ({reference}: `{grp['best_baseline'].iloc[0]}`)", "",
                  markdown_table(g[[*columns, "perplexity", "ratio", "interval", "real"]]), ""]
    return lines


def write_report(results: Path, profile: str, s: dict, calibration: str = "") -> Path:

    lines = [f"# Comparison — profile `{profile}`", "",
             f"Generated by `python -m cbo_utils.experiments.compare --profile {profile}` from `evaluations.csv` and "
             "`selections.csv`. No retraining. Held-out perplexity: "
             + " and ".join(EVAL_TEXTS[t] for t in s.get("ppl_texts") or ["boolq"])
             + f", {s['ppl_windows']} × {s['ppl_seq_len']} tokens each (the same windows for every method). "
             f"Zero-shot: lm-eval ({s['task_source']} tasks), first "
             f"{s['limit']} items of each task, acc_norm for hellaswag/arc_challenge, acc otherwise. Calibration: "
             f"{s['samples']} windows × {s['max_tokens']} tokens for every method (CBO re-ranking variants take "
             f"gradients on the first {s['samples'] - s['rerank_samples']} and re-rank on the last "
             f"{s['rerank_samples']}). Default CBO variant: `{default_variant(results, s)}`"
             + (" (chosen by the rule on development data, `development.json`: the lowest mean log-perplexity over "
                f"M on {DEV_SOURCES[s['dev_source']]}"
                + (f"; a tie with {s['dev_prefer']} goes to {s['dev_prefer']}" if s["dev_prefer"] else "") + ")"
                if s["default"] == "dev" else "") + f". Calibration recipe: `{calibration}`.", ""]
    vote = read_json(results / DEVELOPMENT_FILE) if (results / DEVELOPMENT_FILE).is_file() else {}
    for model, scores in (vote.get("dev_log_ppl") or {}).items():
        v = (vote.get("vote") or {}).get(model, {})
        lines += [f"## Development vote ({model})", "", "Mean over M of log development perplexity per CBO variant "
                  "(lower is better); the rule's choice and why.", "",
                  markdown_table(pd.DataFrame([{"variant": k, "score": round(x, 5)} for k, x in
                                               sorted(scores.items(), key=lambda kv: kv[1])])), "",
                  f"Chosen: **{vote.get('default', {}).get(model)}** — {v.get('reason', '')}.", ""]
    if (results / "evaluations.csv").is_file():
        tab = comparison_table(results, s["tasks"], s["limit"])
        for (model, M), grp in tab.groupby(["model", "M"]):
            lines += [f"## {model}, M = {M}", "", markdown_table(grp.drop(columns=["model", "M"])), ""]
        zs = zero_shot_table(results, s["tasks"], s["limit"])
        if len(zs):
            lines += [f"## Zero-shot with standard errors (first {s['limit']} items per task)", "",
                      "Accuracy ± lm-eval's standard error; mean ± √Σse²/n; vs_best_baseline: the mean's difference to "
                      "the best baseline's at that M, in standard errors of the difference.", ""]
            for (model, M), grp in zs.groupby(["model", "M"]):
                lines += [f"### {model}, M = {M}", "", markdown_table(grp.drop(columns=["model", "M"])), ""]
    paired = paired_table(results, n_boot=int(s.get("bootstrap", 2000)))
    if len(paired):
        atomic_write_text(results / "paired.csv", paired.to_csv(index=False, float_format="%.6g"))
        lines += ["## Paired comparison with the best baseline (held-out perplexity)", "",
                  "Ratio = method's perplexity / the best baseline's on the same windows, with a 95 % bootstrap "
                  f"interval over windows ({int(s.get('bootstrap', 2000))} draws); **real** = the interval excludes 1.",
                  ""]
        lines += paired_sections(paired, "best baseline", ["method", "state"])
    agree = dev_test_agreement(results, s=s)
    if len(agree):
        lines += ["## Development vs test", "",
                  f"Spearman ρ across methods between log development perplexity ({DEV_SOURCES[s['dev_source']]}) "
                  "and log perplexity on each held-out text, per M (methods with a development "
                  "perplexity above 1,000 left out), and the method each ranks first.", "",
                  markdown_table(agree), ""]
    if (results / "evaluations.csv").is_file():
        ev = pd.read_csv(results / "evaluations.csv")
        eff = ev[ev["task"] == "efficiency"]
        if len(eff):
            piv = eff.pivot_table(index=["model", "method", "M"], columns="metric", values="value",
                                  aggfunc="first").reset_index()
            lines += ["## Efficiency of the exported models (fresh process, CPU float32, prompt 128, generate 32)", "",
                      markdown_table(piv), ""]
    if (results / "skipped.json").is_file():
        lines += ["## Not applicable", ""] + [f"- {n['model']}, M = {n['M']}, {n['method']}: {n['reason']}"
                                              for n in read_json(results / "skipped.json")] + [""]
    if (results / "correlations.csv").is_file():
        lines += ["## Energy vs held-out perplexity (Spearman ρ)", "",
                  markdown_table(pd.read_csv(results / "correlations.csv")), ""]
    return atomic_write_text(results / "comparison.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="mini")
    ap.add_argument("--results", default=None)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--M", nargs="*", type=int, default=None)
    ap.add_argument("--stages", nargs="*", default=["select", "develop", "evaluate", "correlate", "efficiency",
                                                    "report"])
    args = ap.parse_args(argv)
    path = run_compare(args.profile, Path(args.results) if args.results else None, args.models, args.M, args.stages)
    print(f"report: {path}")
    return 0


__all__ = ["comparison_table", "compare_settings", "paired_table", "run_compare", "write_report", "zero_shot_table"]

if __name__ == "__main__":
    sys.exit(main())
