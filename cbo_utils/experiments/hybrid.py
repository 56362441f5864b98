"""Type-restricted block removal on hybrid (Mamba2 / MoE / attention) models: the paper's Nemotron experiments.

The paper prunes NVIDIA-Nemotron-3-Nano-30B-A3B (52 layers, pattern :data:`NANO_PATTERN`: 23 Mamba2 "M", 23 MoE
"E", 6 attention "*") by removing blocks of ONE type only — 2 attention, or 2 / 3 MoE — i.e. by solving the
block-removal problem on that type's blocks (C(6, 2) = 15 and C(23, 3) = 1,771 states), and compares against block
influence. This module provides

- :func:`standin_nemotron_h` — a *stand-in* for the real checkpoint (no GPU and no Hub here): a small NemotronH
  with the exact Nano layer pattern, built by :func:`cbo_utils.model.tiny.tiny_nemotron_h` and trained briefly on SciQ
  text so that its gradients mean something; cached as a ``save_pretrained`` folder. Every number it produces says
  it comes from a stand-in.
- :func:`exact_lowest_by_type` — the k lowest states of ``xᵀQx`` under a per-type budget (``{"moe": 3}``,
  ``{"attention": 2}``, ``{"moe": 1, "mamba": 1}``), solved exactly; mixed budgets enumerate the cartesian product
  of the per-type combinations.
- :func:`block_influence_by_type` — ShortGPT's block influence restricted to the same budget.
- :func:`run_hybrid_experiment` — gradients → Fisher → the k lowest states per budget → held-out perplexity and
  next-token accuracy of the dense model, every state and the BI selections, with retention; resumable.
- :func:`prune_checkpoint_files` — removes blocks from a saved checkpoint folder *without loading the model*
  (safetensors shards, index, config, quantisation metadata): how the paper profile evaluates the FP8 checkpoint
  with the selection computed on the BF16 one.

``python -m cbo_utils.experiments.hybrid --profile tiny|mini [--results DIR]`` runs the stand-in experiment of a profile
(settings: the profile's optional ``hybrid:`` section over :func:`hybrid_settings`' defaults).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cbo_utils.calibration import OPENHERMES, CalibrationSet, embedded, from_hf_dataset, heldout_text, load_calibration
from cbo_utils.core.artifacts import (
    atomic_write_text,
    format_blocks,
    parse_blocks,
    provenance,
    read_json,
    sidecar_path,
    write_sidecar,
)
from cbo_utils.core.profiles import check_keys, check_like, profile_with, results_dir
from cbo_utils.core.tables import markdown_table, read_table, upsert_rows
from cbo_utils.evaluate.perplexity import perplexity, perplexity_windows
from cbo_utils.evaluate.reasoning import evaluate_reasoning
from cbo_utils.gradients import GRADIENTS_FILE, collect_gate_gradients, load_gradients
from cbo_utils.model.blocks import PATTERN_LETTER, block_types
from cbo_utils.model.load import load_model
from cbo_utils.model.standin import (
    NANO_MODEL_ID,
    NANO_PATTERN,
    STANDIN_NOTE,
    STANDIN_PREFIX,
    sciq_plain_texts,
    standin_nemotron_h,
    standin_settings,
)
from cbo_utils.problem.budgets import budget_label, check_budget, normalise_budget
from cbo_utils.problem.energies import energy_gradient, gradient_energy
from cbo_utils.problem.ising import quadratic_form
from cbo_utils.prune.files import layout_from_config, prune_checkpoint_files
from cbo_utils.select.baselines import block_statistics
from cbo_utils.select.baselines import describe_calibration as _describe
from cbo_utils.select.cbo import calibration_scores, spearman
from cbo_utils.select.selection import Selection
from cbo_utils.solvers.by_type import exact_lowest_by_type

#: The budgets the stand-in experiment runs by default.
DEFAULT_BUDGETS: list[dict[str, int]] = [{"moe": 2}, {"moe": 3}, {"attention": 1}, {"attention": 2}, {"mamba": 2},
                                         {"moe": 1, "mamba": 1}]


def block_influence_by_type(model, calibration, budget: Mapping[str, int] | str, batch_size: int = 1,
                            iterative: bool = False, keep: Iterable[int] = ()):
    """ShortGPT's block influence (BI_i = 1 − mean_tokens cos(x_i, y_i),
    :func:`cbo_utils.select.baselines.block_statistics`) restricted to a per-type budget: the ``budget[t]`` lowest-BI
    blocks of each type ``t`` (ties → lower index).

    ``iterative=True`` (the paper's BI): repeatedly remove the lowest-BI block among the types whose quota is not yet
    filled, recomputing BI on the gated (shrunken) model; ``relative`` records each step's index in the model of
    that step. Returns a :class:`cbo_utils.select.selection.Selection` whose ``meta`` records the budget.
    """

    t0 = time.perf_counter()
    b = normalise_budget(budget)
    types = block_types(model)
    check_budget(types, b, keep)
    keep = {int(x) for x in keep}
    M = sum(b.values())
    first = block_statistics(model, calibration, batch_size)["bi"].tolist()
    removed: list[int] = []
    relative: list[int] = []
    if not iterative:
        for t, c in b.items():
            cand = sorted((i for i, tt in enumerate(types) if tt == t and i not in keep), key=lambda i: (first[i], i))
            removed += cand[:c]
        order = sorted(removed, key=lambda i: (first[i], i))
    else:
        left = dict(b)
        bi = first
        for step in range(M):
            if step:
                bi = block_statistics(model, calibration, batch_size, removed=removed)["bi"].tolist()
            cand = [i for i, tt in enumerate(types) if left.get(tt, 0) > 0 and i not in removed and i not in keep]
            best = min(cand, key=lambda i: (bi[i], i))
            relative.append(best - sum(1 for r in removed if r < best))
            removed.append(best)
            left[types[best]] -= 1
        order = list(removed)
    name = "block_influence_iterative" if iterative else "block_influence"
    return Selection(name, M, removed, order=order, relative=relative or None,
                     scores=[v if types[i] in b else None for i, v in enumerate(first)],
                     seconds=time.perf_counter() - t0, calibration=_describe(calibration),
                     meta={"budget": budget_label(b), "batch_size": batch_size, "iterative": iterative,
                           "keep": sorted(keep)})


def _model_fingerprint(model) -> str:
    """A cheap identity of the weights (names, shapes and the values of the first and last two tensors)."""
    h = hashlib.sha256()
    params = list(model.named_parameters())
    h.update(json.dumps([[n, list(p.shape)] for n, p in params]).encode())
    for _, p in params[:2] + params[-2:]:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return "w" + h.hexdigest()[:16]  # a letter first: a CSV reader never takes it for a number


def _windows_id(windows: torch.Tensor) -> str:
    """Identity of the evaluation windows (hash of the token ids): evaluation rows are reused only for the same."""
    return "x" + hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


STATES_FILE = "hybrid_states.csv"


EVALUATIONS_FILE = "hybrid_evaluations.csv"


REPORT_FILE = "hybrid.md"


EVAL_COLUMNS = ["model", "stand_in", "budget", "method", "rank", "energy", "removed_blocks", "removed_types",
                "perplexity", "accuracy", "ppl_retention", "accuracy_retention", "nll", "tokens", "seconds",
                "eval_source", "eval_id", "model_fingerprint", "calibration_sha256"]


EVAL_KEY = ["model", "model_fingerprint", "eval_id", "budget", "method", "removed_blocks"]


_TEXT_COLUMNS = ("model", "model_fingerprint", "eval_id", "budget", "method", "removed_blocks", "removed_types",
                 "eval_source", "calibration_sha256", "relative_blocks")


_NUMBER_COLUMNS = ("perplexity", "accuracy", "energy", "rank", "ppl_retention", "accuracy_retention", "nll",
                   "rerank_ce", "tokens", "seconds", "selection_seconds")


def _read_evaluations(path: Path) -> pd.DataFrame:
    """The evaluations table with its text columns kept as text ("12" stays "12", never 12.0)."""
    return read_table(path, text_columns=_TEXT_COLUMNS, number_columns=_NUMBER_COLUMNS)


def _add_evaluations(path: Path, rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Add ``rows`` to the evaluations CSV, replacing rows with the same :data:`EVAL_KEY`."""
    return upsert_rows(path, rows, EVAL_COLUMNS, EVAL_KEY, require_columns=False, text_columns=_TEXT_COLUMNS,
                       number_columns=_NUMBER_COLUMNS, bool_columns=("stand_in", "rerank_pick"),
                       int_columns=("rank",), float_format="%.17g")


def _removed_types(types: Sequence[str], blocks: Sequence[int]) -> str:
    """Pattern letters of the removed blocks, in block order (``[1, 5]`` of the Nano pattern → ``"E*"``)."""
    return "".join(PATTERN_LETTER.get(types[b], "?") for b in sorted(blocks))


def run_hybrid_experiment(model, tokenizer, calibration, eval_texts_or_windows, budgets: Sequence[Mapping | str], *,
                          out_dir, stand_in: bool, k: int = 10, model_name: str | None = None,
                          rerank_calibration=None, energy: str = "fisher", gradient_batch_size: int = 8,
                          random_removal: tuple[int, int] | None = None, points_per_sample: int = 1, seed: int = 0,
                          eval_seq_len: int = 256, eval_windows: int = 16, eval_batch_size: int = 8,
                          eval_source: str = "", block_influence: Sequence[str] = ("one_shot", "iterative"),
                          bi_batch_size: int = 8, keep: Iterable[int] = (), notes: Sequence[str] = (),
                          progress: bool = True) -> dict[str, Any]:
    """Type-restricted CBO vs block influence on one model, evaluated on held-out text; resumable.

    1. **gradients** — per-sample gate gradients on ``calibration``
       (:func:`cbo_utils.gradients.collect_gate_gradients`): the paper's recipe at α = 1 by default;
       ``random_removal=(lo, hi)`` with ``points_per_sample`` gives the stochastic-depth rows (each at a random partial
       removal) that this package found much better on SmolLM2. Saved as ``out_dir/gradients.safetensors`` (+ sidecar)
       and reused when the model, calibration and options match.
    2. **states** — Fisher ``H = AᵀA/m`` (``energy="taylor"``: ``−gᵀx + ½xᵀHx``); for each budget the ``k`` lowest
       states, exactly (:func:`exact_lowest_by_type`) → ``hybrid_states.csv``. With ``rerank_calibration`` (windows
       disjoint from ``calibration`` and from the evaluation text) each state also gets its cross-entropy there
       (``rerank_ce``): the predeclared re-ranking rule picks the lowest.
    3. **block influence** — :func:`block_influence_by_type` per budget, one-shot and/or iterative
       (``block_influence``), on the calibration windows (plus ``rerank_calibration``: every method sees the same
       tokens).
    4. **evaluate** — perplexity and next-token top-1 accuracy (:func:`cbo_utils.evaluate.perplexity.perplexity`) on
       held-out windows (``eval_texts_or_windows``: a ``(n, seq_len)`` tensor, or texts cut by
       :func:`cbo_utils.evaluate.perplexity.perplexity_windows` into ``eval_windows × eval_seq_len``) of the dense
       model, every state (method ``cbo:<rank>``) and every BI selection, on the gated model (α = 0 on removed blocks,
       equal to physical removal). Retention: ``accuracy / dense accuracy`` and ``dense perplexity / perplexity``. Rows
       go to ``hybrid_evaluations.csv`` as they are measured; a row already there (same model weights, evaluation
       windows, budget, method and removed blocks) is not recomputed.
    5. **report** — ``hybrid.md``; its first line says when the model is a stand-in (``stand_in=True``), as does
       the ``stand_in`` column of both tables.

    Returns ``{"states": DataFrame, "evaluations": DataFrame, "paths": {...}, "gradients": GradientResult}``.
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    types = block_types(model)
    keep = tuple(sorted(int(b) for b in keep))
    budgets_n, labels = _checked_budgets(budgets, types, keep, block_influence, energy)
    model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    model.eval()
    fingerprint = _model_fingerprint(model)
    if isinstance(eval_texts_or_windows, torch.Tensor):
        windows = eval_texts_or_windows.to(torch.long)
    else:
        windows = perplexity_windows(tokenizer, list(eval_texts_or_windows), seq_len=eval_seq_len,
                                     windows=eval_windows)
    calib_sha = calibration.sha256 if hasattr(calibration, "sha256") else ""

    # ---- 1. gradients (cached)
    grad_file = out_dir / GRADIENTS_FILE
    gparams = {"model": model_name, "model_fingerprint": fingerprint, "calibration_sha256": calib_sha,
               "random_removal": list(random_removal) if random_removal else None,
               "points_per_sample": points_per_sample, "seed": seed, "batch_size": gradient_batch_size}
    grads = _cached_gradients(model, calibration, grad_file, gparams, stand_in=stand_in, progress=progress)
    Q, const = quadratic_form(grads.H.numpy(), energy_gradient(energy, grads.g.numpy()), energy)

    # ---- 2. states per budget (cheap and deterministic: always recomputed)
    states, solver_infos = _states_by_budget(model, Q, const, types, budgets_n, labels, k=k, energy=energy,
                                             keep=keep, rerank_calibration=rerank_calibration)
    states.insert(0, "stand_in", bool(stand_in))
    states.insert(0, "model", model_name)
    states_path = out_dir / STATES_FILE
    atomic_write_text(states_path, states.to_csv(index=False, float_format="%.17g", lineterminator="\n"))
    write_sidecar(states_path, provenance(
        "hybrid_states", {"budgets": labels, "k": k, "energy": energy, "keep": list(keep),
                          "model": model_name, "stand_in": stand_in},
        inputs={"gradients": grad_file}, solver_info=solver_infos,
        note=STANDIN_NOTE if stand_in else None))

    # ---- 3./4. evaluations (resumable)
    table = _EvaluationTable(out_dir / EVALUATIONS_FILE, model, windows, types, eval_batch_size, {
        "model": model_name, "stand_in": bool(stand_in), "eval_source": eval_source, "eval_id": _windows_id(windows),
        "model_fingerprint": fingerprint, "calibration_sha256": calib_sha})
    table.drop_stale()
    table.dense = table.done_row("", "dense") or table.measure(
        "", "dense", [], {"rank": None, "energy": None, "ppl_retention": 1.0, "accuracy_retention": 1.0})
    bi_calib = calibration
    if rerank_calibration is not None:
        bi_calib = CalibrationSet(list(calibration) + list(rerank_calibration),
                                  {**getattr(calibration, "recipe", {}), "part": "gradient + re-rank windows"})
    jobs = _evaluation_jobs(states, budgets_n, labels, block_influence)
    for label, method, removed, extra in tqdm(jobs, desc="hybrid evaluations", unit="model", disable=not progress):
        if removed is None:  # a block-influence selection: reuse the recorded one when resuming
            prev = table.done_row(label, method)
            if prev is not None and str(prev.get("calibration_sha256")) == calib_sha:
                continue
            sel = block_influence_by_type(model, bi_calib, extra.pop("budget_dict"), batch_size=bi_batch_size,
                                          iterative=method.endswith("iterative"), keep=keep)
            removed = sel.removed
            extra = {"rank": None, "energy": float(removed_energy(Q, const, removed)),
                     "selection_seconds": round(sel.seconds, 3), "relative_blocks": " ".join(map(str, sel.relative))
                     if sel.relative else ""}
        elif table.done_row(label, method, format_blocks(removed)) is not None:
            continue
        table.measure(label, method, removed, extra)

    evaluations = table.rows()
    eval_path = table.path
    write_sidecar(eval_path, provenance(
        "hybrid_evaluations", {"budgets": labels, "k": k, "energy": energy, "eval_source": eval_source,
                               "eval_windows": int(windows.shape[0]), "eval_seq_len": int(windows.shape[1]),
                               "random_removal": list(random_removal) if random_removal else None,
                               "points_per_sample": points_per_sample, "model": model_name, "stand_in": stand_in},
        inputs={"states": states_path, "gradients": grad_file}, note=STANDIN_NOTE if stand_in else None))
    report = write_hybrid_report(out_dir, evaluations, states, model_name=model_name, stand_in=stand_in,
                                 settings={"k": k, "energy": energy, "eval_source": eval_source,
                                           "eval_windows": int(windows.shape[0]), "eval_seq_len": int(windows.shape[1]),
                                           "calibration": calibration.describe() if hasattr(calibration, "describe")
                                           else {"samples": len(list(calibration))},
                                           "rerank_samples": len(rerank_calibration) if rerank_calibration is not None
                                           else 0, "random_removal": random_removal,
                                           "points_per_sample": points_per_sample, "gradient_rows": grads.m},
                                 notes=notes)
    return {"states": states, "evaluations": evaluations, "gradients": grads,
            "paths": {"states": states_path, "evaluations": eval_path, "report": report, "gradients": grad_file}}


def _checked_budgets(budgets, types: Sequence[str], keep: Sequence[int], block_influence: Sequence[str],
                     energy: str) -> tuple[list[dict[str, int]], list[str]]:
    """The budgets normalised, and their labels; refuses an empty or repeated list, a budget the model cannot
    meet, an unknown block-influence kind or energy."""
    budgets_n = [normalise_budget(b) for b in budgets]
    if not budgets_n:
        raise ValueError("give at least one budget, e.g. [{'moe': 3}]")
    labels = [budget_label(b) for b in budgets_n]
    if len(set(labels)) != len(labels):
        raise ValueError(f"budgets are listed more than once: {labels}")
    bad_bi = [m for m in block_influence if m not in ("one_shot", "iterative")]
    if bad_bi:
        raise ValueError(f"block_influence entries must be 'one_shot' or 'iterative', got {bad_bi}")
    gradient_energy(energy)  # refuses an unknown energy (naming the registered ones) or the pair energy
    for b in budgets_n:
        check_budget(types, b, keep)
    return budgets_n, labels


def _cached_gradients(model, calibration, grad_file: Path, gparams: dict, *, stand_in: bool, progress: bool):
    """The gate gradients for ``gparams`` (model fingerprint, calibration, stochastic-depth options): read back from
    ``grad_file`` when its sidecar records the same parameters, else collected (resumable) and saved."""
    if grad_file.is_file() and sidecar_path(grad_file).is_file() and \
            read_json(sidecar_path(grad_file)).get("parameters") == gparams:
        return load_gradients(grad_file)
    rr = gparams["random_removal"]
    kw = {"random_removal": tuple(rr), "points_per_sample": gparams["points_per_sample"], "seed": gparams["seed"]} \
        if rr else {}
    grads = collect_gate_gradients(model, calibration, batch_size=gparams["batch_size"], progress=progress,
                                   checkpoint=grad_file.parent / "gradients.partial", **kw)
    grads.save(grad_file, provenance("gate_gradients", gparams, stand_in=stand_in))
    return grads


def _states_by_budget(model, Q, const: float, types: Sequence[str], budgets_n, labels, *, k: int, energy: str,
                      keep: Sequence[int], rerank_calibration=None) -> tuple[pd.DataFrame, dict]:
    """The ``k`` lowest states of every budget (exact), with their removed types; with ``rerank_calibration`` each
    state's cross-entropy there and the re-ranking pick. Returns the table and the solver information per budget."""
    frames, infos = [], {}
    for b, label in zip(budgets_n, labels, strict=True):
        df = exact_lowest_by_type(Q, types, b, k=k, const=const, energy=energy, keep=keep)
        infos[label] = df.attrs["solver_info"]
        df.insert(0, "budget", label)
        df["removed_types"] = [_removed_types(types, parse_blocks(s)) for s in df["removed_blocks"]]
        df["n_states"] = infos[label]["n_states"]
        if rerank_calibration is not None:
            sets = [parse_blocks(s) for s in df["removed_blocks"]]
            df["rerank_ce"] = calibration_scores(model, sets, rerank_calibration, "ce", progress=False)
            pick = int(df.sort_values(["rerank_ce", "rank"]).iloc[0]["rank"])
            df["rerank_pick"] = df["rank"] == pick
        frames.append(df)
    return pd.concat(frames, ignore_index=True), infos


def _evaluation_jobs(states: pd.DataFrame, budgets_n, labels, block_influence: Sequence[str]) -> list[tuple]:
    """``(budget, method, removed blocks or None, extra columns)`` for every state and every block-influence
    selection (None: selected when evaluated)."""
    jobs: list[tuple[str, str, list[int] | None, dict]] = []
    for b, label in zip(budgets_n, labels, strict=True):
        for _, r in states[states["budget"] == label].iterrows():
            jobs.append((label, f"cbo:{int(r['rank'])}", parse_blocks(r["removed_blocks"]),
                         {"rank": int(r["rank"]), "energy": float(r["energy"]),
                          **({"rerank_ce": float(r["rerank_ce"]), "rerank_pick": bool(r["rerank_pick"])}
                             if "rerank_ce" in r else {})}))
        for kind in block_influence:
            jobs.append((label, "block_influence" if kind == "one_shot" else "block_influence_iterative", None,
                         {"budget_dict": b}))
    return jobs


class _EvaluationTable:
    """The resumable ``hybrid_evaluations.csv`` of one model's weights on one set of evaluation windows: rows are
    looked up, measured (gated, retentions against :attr:`dense`) and appended as they come."""

    def __init__(self, path: Path, model, windows: torch.Tensor, types: Sequence[str], batch_size: int, base: dict):
        self.path, self.model, self.windows, self.types, self.batch_size = path, model, windows, types, batch_size
        self.base, self.dense = base, None

    def _mine(self, tab: pd.DataFrame) -> pd.Series:
        return ((tab["model"].astype(str) == self.base["model"])
                & (tab["model_fingerprint"].astype(str) == self.base["model_fingerprint"])
                & (tab["eval_id"].astype(str) == self.base["eval_id"]))

    def drop_stale(self) -> None:
        """Drop this model's rows measured on other weights or other evaluation windows."""
        old = _read_evaluations(self.path)
        if not len(old):
            return
        stale = (old["model"].astype(str) == self.base["model"]) & ~self._mine(old)
        if stale.any():
            print(f"[hybrid] dropping {int(stale.sum())} evaluation rows of other weights or evaluation windows")
            atomic_write_text(self.path, old[~stale].to_csv(index=False, lineterminator="\n"))

    def done_row(self, budget: str, method: str, removed: str | None = None) -> dict | None:
        """The recorded evaluation of (budget, method[, removed blocks]) for these weights and windows, or None."""
        tab = _read_evaluations(self.path)
        if not len(tab):
            return None
        sel = tab[self._mine(tab) & (tab["budget"].astype(str) == budget) & (tab["method"].astype(str) == method)]
        if removed is not None:
            sel = sel[sel["removed_blocks"].astype(str) == removed]
        return sel.iloc[0].to_dict() if len(sel) else None

    def measure(self, budget: str, method: str, removed: list[int], extra: dict) -> dict:
        """Evaluate one removal (gated), add retentions, append the row to the table at once."""
        t0 = time.perf_counter()
        r = perplexity(self.model, self.windows, removed=removed or None, batch_size=self.batch_size)
        row = {**self.base, "budget": budget, "method": method, "removed_blocks": format_blocks(removed),
               "removed_types": _removed_types(self.types, removed), "perplexity": r["perplexity"],
               "accuracy": r["accuracy"], "nll": r["nll"], "tokens": r["tokens"],
               "seconds": round(time.perf_counter() - t0, 3), **extra}
        if self.dense is not None:
            d = self.dense
            row["ppl_retention"] = d["perplexity"] / r["perplexity"]
            row["accuracy_retention"] = r["accuracy"] / d["accuracy"] if d["accuracy"] > 0 else float("nan")
        _add_evaluations(self.path, [row])
        return row

    def rows(self) -> pd.DataFrame:
        """This model's rows (these weights, these windows)."""
        tab = _read_evaluations(self.path)
        return tab[self._mine(tab)].reset_index(drop=True) if len(tab) else tab


def removed_energy(Q: np.ndarray, const: float, removed: Sequence[int]) -> float:
    """``xᵀQx + const`` of the state removing ``removed`` (to place a baseline's choice on the energy scale)."""
    x = np.zeros(Q.shape[0])
    x[list(removed)] = 1.0
    return float(x @ Q @ x + const)


def summary_table(evaluations: pd.DataFrame, states: pd.DataFrame) -> pd.DataFrame:
    """Per budget: dense, CBO:0 (ground state), the best of the k lowest states by perplexity on the evaluation text
    (an *oracle*: chosen on evaluation data, as the paper chose its excited states by inspection), the re-ranked
    pick (predeclared rule, when re-ranking ran) and the block-influence selections, with perplexity, ``delta_nll``
    (mean next-token NLL minus the dense model's, nats), accuracy and retentions."""
    ev = evaluations.copy()
    ev["rank"] = pd.to_numeric(ev["rank"], errors="coerce")
    rows = []
    dense = ev[ev["method"] == "dense"]
    cols = ["perplexity", "delta_nll", "ppl_retention", "accuracy", "accuracy_retention"]
    dense_nll = float(dense.iloc[0]["nll"]) if len(dense) else float("nan")
    ev["delta_nll"] = pd.to_numeric(ev["nll"], errors="coerce") - dense_nll
    for label in dict.fromkeys(states["budget"]):
        sub = ev[ev["budget"] == label]
        cbo = sub[sub["method"].str.startswith("cbo:")].sort_values("rank")
        picks: list[tuple[str, pd.Series]] = []
        if len(dense):
            picks.append(("dense", dense.iloc[0]))
        if len(cbo):
            picks.append(("CBO:0 (ground state)", cbo.iloc[0]))
            best = cbo.sort_values(["perplexity", "rank"]).iloc[0]
            picks.append((f"best of {len(cbo)} lowest by eval ppl (oracle): CBO:{int(best['rank'])}", best))
            st = states[states["budget"] == label]
            if "rerank_pick" in st and st["rerank_pick"].astype(str).str.lower().eq("true").any():
                want = st[st["rerank_pick"].astype(str).str.lower().eq("true")].iloc[0]["removed_blocks"]
                rp = cbo[cbo["removed_blocks"] == want]
                if len(rp):
                    picks.append((f"re-ranked on calibration CE (predeclared): CBO:{int(rp.iloc[0]['rank'])}",
                                  rp.iloc[0]))
        for m in ("block_influence", "block_influence_iterative"):
            s = sub[sub["method"] == m]
            if len(s):
                picks.append(("BI one-shot" if m == "block_influence" else "BI iterative", s.iloc[0]))
        for name, r in picks:
            rows.append({"budget": label if name != "dense" else label, "selection": name,
                         "removed": r["removed_blocks"] or "—", "types": r.get("removed_types") or "",
                         "energy": r.get("energy"), **{c: r.get(c) for c in cols}})
    return pd.DataFrame(rows)


def write_hybrid_report(out_dir, evaluations: pd.DataFrame, states: pd.DataFrame, *, model_name: str, stand_in: bool,
                        settings: Mapping[str, Any], notes: Sequence[str] = ()) -> Path:
    """Write ``hybrid.md``: a stand-in warning as the FIRST line when ``stand_in``, the settings, one table per
    budget (:func:`summary_table`) and Spearman ρ(energy, held-out log-perplexity) over each budget's k states."""

    out_dir = Path(out_dir)
    lines = []
    if stand_in:
        lines.append(f"**STAND-IN MODEL — not {NANO_MODEL_ID}.** {STANDIN_NOTE}")
        lines.append("")
    lines += [f"# Type-restricted block removal: CBO vs block influence — `{model_name}`", ""]
    cal = settings.get("calibration") or {}
    lines += [
        f"Generated by `cbo_utils.experiments.hybrid`. Gradients: {settings.get('gradient_rows')} rows on "
        f"{cal.get('samples')} calibration windows ({cal.get('tokens')} tokens, source {cal.get('source')}"
        f"{', plain text' if cal.get('chat_template') is False else ''}); "
        + ("the paper's recipe (α = 1)" if not settings.get("random_removal") else
           f"stochastic depth: random partial removals of {settings['random_removal']} blocks, "
           f"{settings.get('points_per_sample')} points per window")
        + f"; energy `{settings.get('energy')}`; the k = {settings.get('k')} lowest states of each budget found "
          "exactly. Evaluation: perplexity and next-token top-1 accuracy on "
          f"{settings.get('eval_windows')} × {settings.get('eval_seq_len')} tokens of {settings.get('eval_source')} "
          "— never calibration or training text — on the gated model (α = 0 on removed blocks = physical removal). "
          "Retention: pruned / dense accuracy, dense / pruned perplexity; delta_nll: the loss increase over the dense "
          "model (nats per token), the clearest comparison when every retention is close to 1. No retraining. Types: "
          "M Mamba2, E MoE, * attention, - MLP.", ""]
    if settings.get("rerank_samples"):
        lines += [f"Re-ranking (predeclared): the k states' cross-entropy on {settings['rerank_samples']} further "
                  "calibration windows (not used for the gradients, not evaluation text); the lowest is picked.", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    tab = summary_table(evaluations, states)
    for label in dict.fromkeys(states["budget"]):
        sub = tab[tab["budget"] == label].drop(columns=["budget"])
        n_states = states[states["budget"] == label]["n_states"].iloc[0]
        lines += [f"## Budget `{label}` ({n_states:,} feasible states)", "", markdown_table(sub), ""]
    rho_rows = []
    ev = evaluations[evaluations["method"].astype(str).str.startswith("cbo:")]
    for label, grp in ev.groupby("budget", sort=False):
        if len(grp) >= 3:
            rho_rows.append({"budget": label, "states": len(grp),
                             "spearman(energy, log ppl)": spearman(grp["energy"].astype(float),
                                                                   np.log(grp["perplexity"].astype(float))),
                             "spearman(energy, accuracy)": spearman(grp["energy"].astype(float),
                                                                    grp["accuracy"].astype(float))})
    if rho_rows:
        lines += ["## Energy vs held-out quality over each budget's k lowest states", "",
                  "A useful energy has a positive ρ with log perplexity and a negative ρ with accuracy.", "",
                  markdown_table(pd.DataFrame(rho_rows)), ""]
    if stand_in:
        lines += ["_Every row above comes from the stand-in model (column `stand_in` = True in the CSV tables). "
                  f"The paper's Nemotron result (Fig. 5, v1: {NANO_MODEL_ID}-FP8, 2 / 3 MoE blocks removed, GPQA and "
                  "AIME25) is not comparable with these numbers._", ""]
    path = atomic_write_text(out_dir / REPORT_FILE, "\n".join(lines) + "\n")
    write_sidecar(path, provenance("hybrid_report", dict(settings), stand_in=stand_in,
                                   inputs={"evaluations": out_dir / EVALUATIONS_FILE}))
    return path


#: Defaults of the ``hybrid:`` section (the mini profile's values); :data:`TINY_DEFAULTS` overrides for ``tiny``.
HYBRID_DEFAULTS: dict[str, Any] = {
    "model": "standin",            # standin | a local folder / Hub id of a NemotronH checkpoint (paper profile)
    "pattern": NANO_PATTERN,       # stand-in layer pattern
    "hidden": 64,                  # stand-in hidden size
    "train_steps": 300,            # stand-in training: AdamW steps ...
    "train_seq_len": 128,          # ... of train_batch_size windows of train_seq_len tokens
    "train_batch_size": 8,
    "train_lr": 3e-3,
    "calibration": None,           # null = embedded SciQ windows; or a calibration SPEC (embedded, openhermes, ...)
    "calibration_samples": 64,     # gradient windows (SciQ calibration pool, plain text for the stand-in)
    "calibration_max_tokens": 128,
    "calibration_chat": False,     # render the calibration windows with the chat template (real chat models)
    "calibration_max_length": None,  # conversation datasets: skip conversations of this many tokens or more
    "rerank_samples": 16,          # further calibration windows for the predeclared re-ranking rule (0 = off)
    "gradient_batch_size": 8,
    "random_removal": None,        # null = the paper (α = 1); [lo, hi] = stochastic-depth gradients
    "points_per_sample": 1,
    "energy": "fisher",
    "budgets": [dict(b) for b in DEFAULT_BUDGETS],
    "k": 10,
    "eval_source": "sciq",         # sciq = SciQ held-out pool (disjoint from calibration/training) | boolq
    "eval_windows": 32,
    "eval_seq_len": 256,
    "eval_batch_size": 8,
    "block_influence": ["one_shot", "iterative"],
    "bi_batch_size": 8,
    "keep": [],
    "threads": 1,                  # torch threads; the stand-in's ops are tiny: one thread is as fast as two on an
                                   # idle 2-core machine and many times faster when the cores are shared
    "seed": None,                  # null = the profile's seed
    "prune_checkpoint": None,      # a checkpoint folder with the same blocks (e.g. the FP8 one): pruned per selection
    "prune_methods": ["cbo:0", "block_influence"],  # which selections prune_checkpoint gets pruned with
    # reasoning evaluation of the pruned prune_checkpoint folders against the unpruned one (the paper: FP8
    # checkpoint, lm-eval aime25 and gpqa with the chat template); retention = pruned score / dense score
    "reasoning_tasks": [],
    "reasoning_source": "builtin",   # builtin = lm-eval's own task definitions (Hub data) | offline
    "reasoning_chat_template": True,
    "reasoning_gen_kwargs": None,    # overrides of the tasks' generation settings
    "reasoning_limit": None,
    "reasoning_dtype": "bfloat16",   # dtype for loading; an FP8 checkpoint keeps its quantised weights
    "reasoning_batch_size": 8,
}


#: Defaults for the ``paper`` profile: the real BF16 checkpoint (GPUs, Hub access), the paper's calibration and
#: budgets; set ``prune_checkpoint`` to the downloaded FP8 folder to get pruned FP8 checkpoints for evaluation.
PAPER_DEFAULTS: dict[str, Any] = {
    "model": "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "calibration": "openhermes", "calibration_samples": 2048,
    "calibration_max_tokens": None, "calibration_max_length": 6000, "calibration_chat": True, "rerank_samples": 0,
    "budgets": [{"attention": 2}, {"moe": 2}, {"moe": 3}], "k": 20, "eval_source": "boolq", "eval_windows": 64,
    "eval_seq_len": 1024, "gradient_batch_size": 1, "eval_batch_size": 4, "bi_batch_size": 1, "threads": None,
    "prune_checkpoint": "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8",
    "reasoning_tasks": ["aime25", "gpqa_diamond_cot_zeroshot"],
    "reasoning_gen_kwargs": {"max_gen_toks": 32768, "do_sample": False, "temperature": 0.0},
}


TINY_DEFAULTS: dict[str, Any] = {
    "train_steps": 30, "train_seq_len": 64, "train_batch_size": 4, "calibration_samples": 16,
    "calibration_max_tokens": 64, "rerank_samples": 4, "k": 3, "eval_windows": 4, "eval_seq_len": 128,
    "gradient_batch_size": 8, "bi_batch_size": 8,
}


def hybrid_settings(profile_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The profile's optional ``hybrid:`` section over the defaults in code (:data:`HYBRID_DEFAULTS`, with
    :data:`TINY_DEFAULTS` for the ``tiny`` and :data:`PAPER_DEFAULTS` for the ``paper`` profile), validated.
    ``seed`` falls back to the profile's ``seed``."""
    cfg = dict(profile_cfg or {})
    base = dict(HYBRID_DEFAULTS)
    if cfg.get("profile") == "tiny":
        base.update(TINY_DEFAULTS)
    elif cfg.get("profile") == "paper":
        base.update(PAPER_DEFAULTS)
    section = cfg.get("hybrid") or {}
    if not isinstance(section, Mapping):
        raise ValueError(f"the profile's hybrid: section must be a mapping, got {type(section).__name__}")
    check_keys("hybrid", section, HYBRID_DEFAULTS)
    check_like("hybrid", section, base)
    s = {**base, **section}
    if s["seed"] is None:
        s["seed"] = int(cfg.get("seed", 0))
    s["budgets"] = [normalise_budget(b) for b in s["budgets"]]
    if not s["budgets"]:
        raise ValueError("hybrid.budgets is empty")
    if s["random_removal"] is not None:
        rr = list(s["random_removal"])
        if len(rr) != 2 or not all(isinstance(v, int) for v in rr) or not 0 <= rr[0] <= rr[1]:
            raise ValueError(f"hybrid.random_removal must be null or [lo, hi] with 0 <= lo <= hi, got {rr}")
        s["random_removal"] = rr
    if s["eval_source"] not in ("sciq", "boolq"):
        raise ValueError(f"hybrid.eval_source must be 'sciq' or 'boolq', got {s['eval_source']!r}")
    for key in ("k", "calibration_samples", "calibration_max_tokens", "eval_windows", "eval_seq_len",
                "gradient_batch_size", "eval_batch_size", "bi_batch_size", "points_per_sample"):
        if key == "calibration_max_tokens" and s[key] is None and s["calibration"] not in (None, "embedded"):
            continue  # no truncation (the paper's recipe) for conversation datasets
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise ValueError(f"hybrid.{key} must be a positive integer, got {s[key]!r}")
    cml = s["calibration_max_length"]
    if cml is not None and (isinstance(cml, bool) or not isinstance(cml, int) or cml < 2):
        raise ValueError(f"hybrid.calibration_max_length must be null or an integer >= 2, got {cml!r}")
    if isinstance(s["rerank_samples"], bool) or not isinstance(s["rerank_samples"], int) or s["rerank_samples"] < 0:
        raise ValueError(f"hybrid.rerank_samples must be an integer >= 0, got {s['rerank_samples']!r}")
    if s["model"] == "standin":
        standin_settings(s["pattern"], s["hidden"], s["train_steps"], s["train_seq_len"], s["train_batch_size"],
                         s["train_lr"], s["seed"])
    return s


def _eval_texts(source: str) -> tuple[list[str], str]:
    """Held-out evaluation texts and their description: ``sciq`` (the SciQ held-out pool as plain text, the
    stand-in's own domain, disjoint by question from its training and calibration text) or ``boolq`` (BoolQ's
    Wikipedia passages, :func:`cbo_utils.calibration.heldout_text`)."""

    if source == "sciq":
        return sciq_plain_texts("heldout"), "the SciQ held-out pool (plain text, disjoint by question from the " \
                                            "calibration and training pool)"
    return heldout_text(), "BoolQ Wikipedia passages"


def run_profile(profile: str, results: str | os.PathLike | None = None, progress: bool = True,
                hybrid: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the hybrid experiment of a profile (``tiny``, ``mini``, or a YAML path) into ``<results>/hybrid/``
    (``results`` defaults to ``results/<profile>``): the stand-in (``hybrid.model: standin``) or a real NemotronH
    checkpoint. Returns :func:`run_hybrid_experiment`'s dict plus ``"model_info"`` and ``"seconds"``. ``hybrid``: the
    profile's ``hybrid:`` section to use instead of the file's (the notebooks pass their parameter)."""

    t0 = time.perf_counter()
    cfg = profile_with(profile, "hybrid", hybrid)
    s = hybrid_settings(cfg)
    if s["threads"]:
        torch.set_num_threads(int(s["threads"]))
    results = results_dir({"profile": cfg.get("profile", str(profile))}, results)
    out_dir = results / "hybrid"
    if s["model"] == "standin":
        model, tok, info = standin_nemotron_h(s["pattern"], s["hidden"], s["train_steps"], s["train_seq_len"],
                                              s["train_batch_size"], s["train_lr"], s["seed"], progress=progress)
        stand_in, name = True, f"{STANDIN_PREFIX}-{info['settings_hash']}"
        print(f"[hybrid] stand-in {name}: {'loaded from cache' if info['loaded_from_cache'] else 'trained'} "
              f"({info['seconds']:.0f} s training, loss {info['loss_first']:.3f} → {info['loss_last']:.3f}, held-out "
              f"{info['heldout_loss_untrained']:.3f} → {info['heldout_loss_trained']:.3f})", flush=True)
    else:

        model, tok = load_model(s["model"], dtype=cfg.get("dtype", "float32"), device_map=cfg.get("device_map"))
        stand_in, name, info = False, s["model"], {"stand_in": False, "path": s["model"]}
    n_total = s["calibration_samples"] + s["rerank_samples"]
    if s["calibration"] in (None, "embedded"):
        calib_all = embedded(tok, samples=n_total, max_tokens=s["calibration_max_tokens"], seed=0,
                             chat=bool(s["calibration_chat"]))
    elif s["calibration_max_length"] and (s["calibration"] == "openhermes" or s["calibration"].startswith("hf:")):

        name = OPENHERMES if s["calibration"] == "openhermes" else s["calibration"].partition(":")[2]
        calib_all = from_hf_dataset(tok, name, samples=n_total, seed=42, max_tokens=s["calibration_max_tokens"],
                                    max_length=s["calibration_max_length"],
                                    enable_thinking=True if s["calibration_chat"] and "qwen3" in name.lower() else None)
    else:

        calib_all = load_calibration(s["calibration"], tok, samples=n_total, max_tokens=s["calibration_max_tokens"])
    calib = CalibrationSet(calib_all.samples[:s["calibration_samples"]],
                           {**calib_all.recipe, "part": f"windows 0..{s['calibration_samples'] - 1} (gradients)"})
    rerank = None
    if s["rerank_samples"]:
        rerank = CalibrationSet(calib_all.samples[s["calibration_samples"]:],
                                {**calib_all.recipe, "part": "re-ranking windows"})
    texts, source = _eval_texts(s["eval_source"])
    notes = []
    if stand_in:
        notes.append(f"Stand-in: {len(s['pattern'])} layers `{s['pattern']}`, hidden {s['hidden']}, "
                     f"{info['parameters']:,} parameters, trained {s['train_steps']} steps × {s['train_batch_size']} "
                     f"× {s['train_seq_len']} tokens ({info['seconds']:.0f} s on this machine's CPU); training loss "
                     f"{info['loss_first']:.3f} → {info['loss_last']:.3f}; held-out loss "
                     f"{info['heldout_loss_untrained']:.3f} (untrained) → {info['heldout_loss_trained']:.3f}.")
    res = run_hybrid_experiment(
        model, tok, calib, texts, s["budgets"], out_dir=out_dir, stand_in=stand_in, k=s["k"], model_name=name,
        rerank_calibration=rerank, energy=s["energy"], gradient_batch_size=s["gradient_batch_size"],
        random_removal=s["random_removal"], points_per_sample=s["points_per_sample"], seed=s["seed"],
        eval_seq_len=s["eval_seq_len"], eval_windows=s["eval_windows"], eval_batch_size=s["eval_batch_size"],
        eval_source=source, block_influence=s["block_influence"], bi_batch_size=s["bi_batch_size"], keep=s["keep"],
        notes=notes, progress=progress)
    if s["prune_checkpoint"]:
        src = _checkpoint_folder(s["prune_checkpoint"])
        res["pruned_checkpoints"] = prune_selections(res["evaluations"], src, out_dir / "pruned_checkpoints",
                                                     s["prune_methods"], source=str(s["prune_checkpoint"]))
        if s["reasoning_tasks"]:
            res["reasoning"] = evaluate_reasoning(
                {p.name: p for p in res["pruned_checkpoints"]}, src, s["reasoning_tasks"], out_dir,
                stand_in=stand_in, source=s["reasoning_source"], apply_chat_template=s["reasoning_chat_template"],
                gen_kwargs=s["reasoning_gen_kwargs"], limit=s["reasoning_limit"], dtype=s["reasoning_dtype"],
                batch_size=s["reasoning_batch_size"])
    res["model_info"] = info
    res["seconds"] = time.perf_counter() - t0
    return res


def _checkpoint_folder(spec) -> Path:
    """A local checkpoint folder, or a Hub id downloaded once into the Hugging Face cache (safetensors, config,
    tokenizer files; never pickles)."""
    if Path(spec).is_dir():
        return Path(spec)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"{spec!r} is not a local folder and the Hub is off (HF_HUB_OFFLINE=1); download it "
                                f"(huggingface-cli download {spec} --local-dir DIR) and set hybrid.prune_checkpoint")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(spec), allow_patterns=["*.json", "*.safetensors", "*.py", "*.txt", "*.model",
                                                             "*.jinja", "*.md"]))


def prune_selections(evaluations: pd.DataFrame, src_dir, out_root, methods: Sequence[str] = ("cbo:0",
                     "block_influence"), source: str | None = None, overwrite: bool = False) -> list[Path]:
    """Prune the checkpoint folder ``src_dir`` (same blocks as the model the selections were made on — e.g. the
    FP8 checkpoint when the selections come from the BF16 one) with each budget's selection by each of ``methods``
    (``cbo:<rank>``, ``block_influence``, ``block_influence_iterative``), using :func:`prune_checkpoint_files`.
    Folders are ``out_root/<budget>__<method>`` (``moe-3__cbo0``); one that already holds the same removal is kept.
    The types of the removed blocks are checked against the checkpoint's own layout."""
    src_dir, out_root = Path(src_dir), Path(out_root)
    n, types, _ = layout_from_config(read_json(src_dir / "config.json"))
    out: list[Path] = []
    for _, r in evaluations.iterrows():
        if r["method"] not in methods or not r["budget"]:
            continue
        removed = parse_blocks(r["removed_blocks"])
        if max(removed) >= n or _removed_types(types, removed) != r["removed_types"]:
            raise ValueError(f"{src_dir} does not have the block layout the selections were made on: budget "
                             f"{r['budget']} {r['method']} removes {removed} ({r['removed_types']}), the checkpoint "
                             f"has {n} blocks with types {_removed_types(types, [b for b in removed if b < n])} there")
        folder = out_root / f"{r['budget'].replace(':', '-').replace('+', '_')}__{r['method'].replace(':', '')}"
        rec = folder / "removed_blocks.json"
        if not overwrite and rec.is_file() and read_json(rec).get("removed_blocks") == removed:
            out.append(folder)
            continue
        out.append(prune_checkpoint_files(src_dir, removed, folder, overwrite=True, method=str(r["method"]),
                                          energy=None if pd.isna(r.get("energy")) else float(r["energy"]),
                                          source=source or str(src_dir), extra={"budget": r["budget"]}))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cbo_utils.experiments.hybrid --profile tiny|mini [--results DIR]``: the type-restricted experiment of
    a profile (the Nemotron stand-in unless the profile's ``hybrid.model`` names a real checkpoint)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="mini", help="tiny | mini | a profile YAML path")
    ap.add_argument("--results", default=None, help="results folder of the profile (default results/<profile>); "
                                                    "the experiment writes into <results>/hybrid/")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    res = run_profile(args.profile, args.results, progress=not args.quiet)
    tab = summary_table(res["evaluations"], res["states"])
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(tab.to_string(index=False))
    print(f"\nreport: {res['paths']['report']}  ({res['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
