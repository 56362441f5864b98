"""Type-restricted block removal on hybrid (Mamba2 / MoE / attention) models: the paper's Nemotron experiments.

The paper prunes NVIDIA-Nemotron-3-Nano-30B-A3B (52 layers, pattern :data:`NANO_PATTERN`: 23 Mamba2 "M", 23 MoE
"E", 6 attention "*") by removing blocks of ONE type only — 2 attention, or 2 / 3 MoE — i.e. by solving the
block-removal problem on that type's blocks (C(6, 2) = 15 and C(23, 3) = 1,771 states), and compares against block
influence. This module provides

- :func:`standin_nemotron_h` — a *stand-in* for the real checkpoint (no GPU and no Hub here): a small NemotronH
  with the exact Nano layer pattern, built by :func:`cbo_utils.tiny.tiny_nemotron_h` and trained briefly on SciQ
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

``python -m cbo_utils.hybrid --profile tiny|mini [--results DIR]`` runs the stand-in experiment of a profile
(settings: the profile's optional ``hybrid:`` section over :func:`hybrid_settings`' defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .artifacts import (
    atomic_folder,
    atomic_write_text,
    format_blocks,
    parse_blocks,
    provenance,
    read_json,
    sidecar_path,
    write_json,
    write_sidecar,
)
from .blocks import ATTENTION, MAMBA, MLP, MOE, Gates, RemovalError

ROOT = Path(__file__).resolve().parent.parent

#: The layer pattern of NVIDIA-Nemotron-3-Nano-30B-A3B (M Mamba2, E MoE, * attention; attention at 5, 12, 19, 26,
#: 33, 42).
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
#: The checkpoint the stand-in stands in for.
NANO_MODEL_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B"
STANDIN_NOTE = (f"This model is a stand-in for {NANO_MODEL_ID}: a small NemotronH with the same layer pattern, "
                "built in code and trained briefly on SciQ text on a CPU. Its numbers exercise the method and the "
                "pipeline; they are not results about the real model.")
STANDIN_PREFIX = "standin-nemotron-h"
STANDIN_INFO = "standin_info.json"
_STANDIN_FORMAT = 1  # bump when the training recipe changes: old caches are then not reused

_LETTER = {"M": MAMBA, "E": MOE, "*": ATTENTION, "-": MLP}
_NATIVE_TYPES = {"linear_attention": MAMBA, "moe": MOE, "full_attention": ATTENTION, "mlp": MLP}
_TYPE_LETTER = {MAMBA: "M", MOE: "E", ATTENTION: "*", MLP: "-"}

#: The budgets the stand-in experiment runs by default.
DEFAULT_BUDGETS: list[dict[str, int]] = [{"moe": 2}, {"moe": 3}, {"attention": 1}, {"attention": 2}, {"mamba": 2},
                                         {"moe": 1, "mamba": 1}]

__all__ = [
    "NANO_PATTERN", "NANO_MODEL_ID", "STANDIN_NOTE", "DEFAULT_BUDGETS", "HYBRID_DEFAULTS", "TINY_DEFAULTS",
    "PAPER_DEFAULTS", "pattern_types", "standin_nemotron_h", "standin_settings", "sciq_plain_texts",
    "normalise_budget", "budget_label", "parse_budget", "TypeBudgetProblem", "type_budget_problem",
    "exact_lowest_by_type", "block_influence_by_type", "evaluate_windows", "removed_energy", "run_hybrid_experiment",
    "summary_table", "write_hybrid_report", "hybrid_settings", "run_profile", "prune_selections",
    "prune_checkpoint_files", "prune_config_dict", "remap_layer_references", "main",
]


def pattern_types(pattern: str) -> list[str]:
    """Block types (``mamba``/``moe``/``attention``/``mlp``, as :func:`cbo_utils.blocks.block_types` names them) of
    a NemotronH pattern string such as :data:`NANO_PATTERN`."""
    bad = sorted({c for c in pattern if c not in _LETTER})
    if bad or not pattern:
        raise ValueError(f"pattern {pattern!r} has unknown letters {bad}: use M (Mamba2), E (MoE), * (attention), "
                         "- (MLP)" if bad else "the pattern is empty")
    return [_LETTER[c] for c in pattern]


# =====================================================================================================================
# budgets
# =====================================================================================================================

def normalise_budget(budget: Mapping[str, int] | str) -> dict[str, int]:
    """A budget as a dict ``{type: count}`` sorted by type name, zero counts dropped; validated.

    Accepts a mapping (``{"moe": 1, "mamba": 1}``) or a label (``"moe:1+mamba:1"``, see :func:`budget_label`).
    """
    if isinstance(budget, str):
        return parse_budget(budget)
    if not isinstance(budget, Mapping):
        raise ValueError(f"a budget maps block types to counts, e.g. {{'moe': 3}}; got {budget!r}")
    out: dict[str, int] = {}
    for t, c in budget.items():
        if not isinstance(t, str) or not t:
            raise ValueError(f"budget keys must be block type names (mamba, moe, attention, mlp, decoder); got {t!r}")
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            if isinstance(c, (float, np.floating)) and float(c).is_integer():
                c = int(c)
            else:
                raise ValueError(f"budget count for {t!r} must be a non-negative integer, got {c!r}")
        if c < 0:
            raise ValueError(f"budget count for {t!r} must be >= 0, got {c}")
        if c:
            out[t] = int(c)
    if not out:
        raise ValueError(f"the budget {dict(budget)!r} removes nothing; give at least one positive count")
    return dict(sorted(out.items()))


def budget_label(budget: Mapping[str, int] | str) -> str:
    """Canonical label of a budget: ``{"moe": 1, "mamba": 1}`` → ``"mamba:1+moe:1"``; ``{"moe": 3}`` → ``"moe:3"``."""
    return "+".join(f"{t}:{c}" for t, c in normalise_budget(budget).items())


def parse_budget(label: str) -> dict[str, int]:
    """Inverse of :func:`budget_label` (also accepts ``,`` as separator): ``"moe:3"`` → ``{"moe": 3}``."""
    out: dict[str, int] = {}
    for part in re.split(r"[+,]", label.strip()):
        name, sep, num = part.strip().partition(":")
        if not sep or not name or not num.strip().isdigit():
            raise ValueError(f"bad budget {label!r}: write TYPE:COUNT joined by '+', e.g. 'moe:3' or 'moe:1+mamba:1'")
        if name.strip() in out:
            raise ValueError(f"budget {label!r} names {name.strip()!r} twice")
        out[name.strip()] = int(num)
    return normalise_budget(out)


def _check_budget(types: Sequence[str], budget: dict[str, int], keep: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Per-type candidate blocks (not in ``keep``) for a normalised budget; clear errors for impossible budgets.

    Rules: every budget type exists in the model; it has enough removable blocks; and a hybrid model keeps at least
    one attention block (cached generation needs it, see :func:`cbo_utils.blocks.check_removal`).
    """
    types = [str(t) for t in types]
    keep = set(int(b) for b in keep)
    known = sorted(set(types))
    cands: dict[str, np.ndarray] = {}
    for t, c in budget.items():
        if t not in known:
            raise ValueError(f"budget type {t!r} does not occur in this model; its block types are {known}")
        cand = np.array([i for i, tt in enumerate(types) if tt == t and i not in keep], dtype=np.int64)
        if c > len(cand):
            raise ValueError(f"the budget removes {c} {t} blocks but only {len(cand)} are removable "
                             f"({sum(1 for x in types if x == t)} in the model, {len(keep)} kept); lower the count")
        cands[t] = cand
    n_att = sum(1 for t in types if t == ATTENTION)
    if ATTENTION in budget and set(types) - {"decoder"} and budget[ATTENTION] >= n_att:
        raise ValueError(f"the budget removes {budget[ATTENTION]} attention blocks but the model has only {n_att}: "
                         "at least one attention block must remain in a hybrid model (cached generation needs it)")
    if sum(budget.values()) >= len(types):
        raise ValueError(f"the budget removes {sum(budget.values())} of {len(types)} blocks; leave at least one")
    return cands


# =====================================================================================================================
# exact type-restricted solving
# =====================================================================================================================

@dataclass(eq=False)
class TypeBudgetProblem:
    """Remove, for every block type ``t`` of ``budget``, exactly ``budget[t]`` blocks of type ``t`` (none of
    ``keep``), minimising ``xᵀQx + const``.

    ``base`` is the equivalent :class:`~cbo_utils.ising.BlockRemovalProblem` without the per-type counts (``M`` =
    total, ``only_types`` = the budget's types, ``keep``): single-type budgets are exactly that problem; mixed ones
    add the per-type counts, which :meth:`feasible` checks.
    """

    Q: np.ndarray = field(repr=False)
    block_types: list[str]
    budget: dict[str, int]
    const: float = 0.0
    keep: tuple[int, ...] = ()
    energy: str = "fisher"
    candidates: dict[str, np.ndarray] = field(init=False, repr=False)
    base: Any = field(init=False, repr=False)

    def __post_init__(self):
        """Normalise and validate the budget, build :attr:`base` and the per-type candidates."""
        from .ising import BlockRemovalProblem

        self.budget = normalise_budget(self.budget)
        if isinstance(self.block_types, str):
            raise ValueError("block_types must be a list with one type name per block, not a single string")
        self.block_types = [str(t) for t in self.block_types]
        # the budget's own checks first: their messages name the budget (BlockRemovalProblem's would not)
        _check_budget(self.block_types, self.budget, [int(b) for b in self.keep if isinstance(b, (int, np.integer))])
        self.base = BlockRemovalProblem(Q=self.Q, M=sum(self.budget.values()), const=self.const,
                                        keep=tuple(self.keep), block_types=self.block_types,
                                        only_types=tuple(self.budget), energy=str(self.energy).lower())
        self.Q, self.const, self.keep = self.base.Q, self.base.const, self.base.keep
        self.candidates = _check_budget(self.block_types, self.budget, self.keep)

    @property
    def N(self) -> int:
        """Number of blocks."""
        return int(self.Q.shape[0])

    @property
    def M(self) -> int:
        """Total number of blocks removed (the sum of the budget)."""
        return int(sum(self.budget.values()))

    @property
    def label(self) -> str:
        """The budget's canonical label (:func:`budget_label`)."""
        return budget_label(self.budget)

    @property
    def per_type_states(self) -> dict[str, int]:
        """``{type: C(removable blocks of the type, count)}``."""
        return {t: math.comb(len(self.candidates[t]), c) for t, c in self.budget.items()}

    @property
    def n_states(self) -> int:
        """Number of feasible states: the product of :attr:`per_type_states`."""
        return math.prod(self.per_type_states.values())

    def energy_of(self, X):
        """``xᵀQx + const`` of full 0/1 states."""
        return self.base.energy_of(X)

    def feasible(self, X) -> np.ndarray:
        """Whether each full state removes exactly ``budget[t]`` blocks of each type ``t`` and nothing else
        (``keep`` respected)."""
        X = np.asarray(X)
        single = X.ndim == 1
        X2 = np.atleast_2d(X).astype(np.int64)
        ok = np.asarray(self.base.feasible(X2), dtype=bool).reshape(-1)
        types = np.asarray(self.block_types, dtype=object)
        for t, c in self.budget.items():
            ok &= X2[:, types == t].sum(axis=1) == c
        return bool(ok[0]) if single else ok


def type_budget_problem(Q_or_H, block_types: Sequence[str], budget: Mapping[str, int] | str, const: float = 0.0,
                        energy: str = "fisher", keep: Iterable[int] = ()) -> TypeBudgetProblem:
    """Build a :class:`TypeBudgetProblem`. ``Q_or_H`` is the symmetric matrix of ``xᵀQx`` — the Fisher ``H`` for
    the paper's energy; for the Taylor energy pass ``Q, const = cbo_utils.ising.quadratic_form(H, g, "taylor")``.
    ``block_types`` are the names :func:`cbo_utils.blocks.block_types` returns; ``energy`` is a label."""
    return TypeBudgetProblem(Q=Q_or_H, block_types=list(block_types), budget=budget, const=const,
                             keep=tuple(keep), energy=energy)


def _product_lowest(Q: np.ndarray, factors: list[np.ndarray], K: int, chunk_elems: int, bar=None
                    ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Approximate energies and index sets of the ~K lowest states of the cartesian product of ``factors``.

    ``factors[t]`` is a ``(n_t, m_t)`` array of absolute block-index subsets of one type. The largest factor is the
    column side (its subsets as 0/1 rows over that type's blocks), the product of the others the row side (mixed-radix
    unranked in chunks); a block of energies is ``E_rows + E_cols + 2·F_rows·1_colsᵀ`` (one matmul), with
    ``F_rows = Σ_{i∈rows} Q[i, column blocks]``. Blocks hold at most ``chunk_elems`` energies, so memory is bounded.
    """
    from .solvers import _CANDIDATE_CAP, _set_sums, _TopK

    ci = int(np.argmax([f.shape[0] for f in factors]))
    col = factors[ci]
    rest = [f for j, f in enumerate(factors) if j != ci]
    col_blocks = np.unique(col)
    pos = np.searchsorted(col_blocks, col)
    ind = np.zeros((col.shape[0], col_blocks.size))
    ind[np.arange(col.shape[0])[:, None], pos] = 1.0
    E_col = _set_sums(Q, col)
    radices = [f.shape[0] for f in rest]
    n_rows = math.prod(radices)  # 1 when there is a single factor
    m_total = col.shape[1] + sum(f.shape[1] for f in rest)
    scale = float(np.abs(Q).max()) * max(1, m_total) ** 2 + 1e-300
    tol = 1e-10 * scale
    top = _TopK(K, tol)
    col_tile = max(1, min(col.shape[0], chunk_elems))
    row_step = max(1, chunk_elems // col_tile)
    n_blocks = 0
    for r0 in range(0, n_rows, row_step):
        r1 = min(n_rows, r0 + row_step)
        if rest:
            digits = np.unravel_index(np.arange(r0, r1, dtype=np.int64), radices)
            R = np.concatenate([f[d] for f, d in zip(rest, digits, strict=True)], axis=1)
        else:
            R = np.zeros((r1 - r0, 0), dtype=np.int64)
        E_row = _set_sums(Q, R)
        F_row = np.zeros((R.shape[0], col_blocks.size))
        for a in range(R.shape[1]):
            F_row += Q[np.ix_(R[:, a], col_blocks)]
        for c0 in range(0, col.shape[0], col_tile):
            c1 = min(col.shape[0], c0 + col_tile)
            blk = E_row[:, None] + E_col[None, c0:c1] + 2.0 * (F_row @ ind[c0:c1].T)
            n_blocks += 1
            flat = blk.reshape(-1)
            kk = min(K, flat.size)
            kth = float(np.partition(flat, kk - 1)[kk - 1])
            cut = min(kth, top.thr) + tol
            hit = np.flatnonzero(flat <= cut)
            if hit.size > _CANDIDATE_CAP:  # only on huge plateaus of equal energies
                hit = hit[np.argpartition(flat[hit], _CANDIDATE_CAP - 1)[:_CANDIDATE_CAP]]
                top.truncated = True
            if hit.size:
                hr, hc = np.divmod(hit, c1 - c0)
                sets = np.sort(np.concatenate([R[hr], col[c0 + hc]], axis=1), axis=1)
                top.add(flat[hit], sets)
                if top.count >= K and not np.isfinite(top.thr):
                    top.prune()
            if bar is not None:
                bar.update(flat.size)
    vals, sets = top.result()
    info = {"column_type_index": ci, "n_row_combinations": n_rows, "n_blocks": n_blocks,
            "candidates": int(vals.size), "candidates_truncated": top.truncated}
    return vals, sets, info


def exact_lowest_by_type(Q_or_H, block_types: Sequence[str], budget: Mapping[str, int] | str, k: int = 20,
                         const: float = 0.0, energy: str = "fisher", keep: Iterable[int] = (), *,
                         method: str = "auto", chunk_elems: int = 2 ** 22, max_states: int = 10 ** 9,
                         progress: bool = False) -> pd.DataFrame:
    """The ``k`` lowest-energy states of ``xᵀQx + const`` that remove exactly ``budget[t]`` blocks of each type
    ``t`` (and none of ``keep``), found by complete enumeration (exact up to float64 rounding).

    ``method="auto"``: a single-type budget is :class:`~cbo_utils.ising.BlockRemovalProblem` with ``only_types``
    solved by :func:`cbo_utils.solvers.exact_lowest`; a mixed budget enumerates the cartesian product of the
    per-type combinations (:func:`_product_lowest`: chunked numpy matmuls, float64, memory bounded by
    ``chunk_elems``). ``method="product"`` uses the product enumerator for single-type budgets too. More than
    ``max_states`` states raise a ``ValueError`` that gives the count.

    Returns the solvers' table (``rank, energy, removed_blocks, solver="exact", seed, feasible, tie``; energies
    recomputed exactly as ``xᵀQx + const``) with ``attrs["solver_info"]`` recording the budget, its label, the
    number of states per type and in total, and timings.
    """
    from tqdm.auto import tqdm

    from .solvers import _MARGIN, _check_k, _results_frame, exact_lowest

    k = _check_k(k)
    if method not in ("auto", "product"):
        raise ValueError(f"method must be 'auto' or 'product', got {method!r}")
    prob = type_budget_problem(Q_or_H, block_types, budget, const=const, energy=energy, keep=keep)
    n_states = prob.n_states
    if n_states > max_states:
        raise ValueError(f"the budget {prob.label} has {n_states:,} feasible states ({prob.per_type_states}), more "
                         f"than max_states = {max_states:,}: enumeration would take too long. Use a smaller budget, "
                         "raise max_states, or solve the single-type sub-problems with a heuristic solver "
                         "(cbo_utils.solvers.tabu on BlockRemovalProblem(only_types=...))")
    t0 = time.perf_counter()
    budget_info = {"budget": dict(prob.budget), "budget_label": prob.label, "per_type_states": prob.per_type_states,
                   "n_states": n_states, "n_states_total": n_states}
    if method == "auto" and len(prob.budget) == 1:
        df = exact_lowest(prob.base, k=k, chunk_elems=chunk_elems, progress=progress)
        df.attrs["solver_info"].update(budget_info, method="single-type exact_lowest (only_types)")
    else:
        factors = [np.array(list(itertools.combinations(prob.candidates[t].tolist(), c)), dtype=np.int64)
                   .reshape(-1, c) for t, c in prob.budget.items()]
        with tqdm(total=n_states, unit="state", unit_scale=True, disable=not progress, desc="exact by type") as bar:
            _, sets, extra = _product_lowest(prob.Q, factors, k + _MARGIN, int(chunk_elems), bar)
        X = np.zeros((sets.shape[0], prob.N), dtype=np.int8)
        if sets.size:
            X[np.arange(sets.shape[0])[:, None], sets] = 1
        t_enum = time.perf_counter() - t0
        df = _results_frame(prob.base, X, "exact", None, k, {**budget_info, **extra,
                                                             "method": "cartesian product of per-type combinations",
                                                             "chunk_elems": int(chunk_elems),
                                                             "enumeration_time_s": t_enum})
    full = np.zeros((len(df), prob.N), dtype=np.int8)
    for r, blocks in enumerate(df["removed_blocks"]):
        full[r, parse_blocks(blocks)] = 1
    df["feasible"] = prob.feasible(full) if len(df) else np.zeros(0, dtype=bool)
    dt = time.perf_counter() - t0
    df.attrs["solver_info"].update({"time_s": dt, "states_per_s": n_states / dt if dt > 0 else float("inf"),
                                    "block_types_of_problem": sorted(set(prob.block_types))})
    return df


# =====================================================================================================================
# block influence restricted to a budget
# =====================================================================================================================

def block_influence_by_type(model, calibration, budget: Mapping[str, int] | str, batch_size: int = 1,
                            iterative: bool = False, keep: Iterable[int] = ()):
    """ShortGPT's block influence (BI_i = 1 − mean_tokens cos(x_i, y_i), :func:`cbo_utils.baselines.block_statistics`)
    restricted to a per-type budget: the ``budget[t]`` lowest-BI blocks of each type ``t`` (ties → lower index).

    ``iterative=True`` (the paper's BI): repeatedly remove the lowest-BI block among the types whose quota is not yet
    filled, recomputing BI on the gated (shrunken) model; ``relative`` records each step's index in the model of
    that step. Returns a :class:`cbo_utils.baselines.Selection` whose ``meta`` records the budget.
    """
    from .baselines import Selection, _describe, block_statistics
    from .blocks import block_types

    t0 = time.perf_counter()
    b = normalise_budget(budget)
    types = block_types(model)
    _check_budget(types, b, keep)
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


# =====================================================================================================================
# the stand-in model
# =====================================================================================================================

def sciq_plain_texts(split: str = "calibration", seed: int = 0) -> list[str]:
    """The SciQ chats of :func:`cbo_utils.calibration.sciq_conversations` as plain text, one string per conversation:
    question, support paragraph and answer on their own lines — the same rendering as
    ``calibration.embedded(..., chat=False)``. ``split``: ``calibration`` or ``heldout`` (disjoint by question)."""
    from .calibration import sciq_conversations

    return ["\n".join(t["content"] for t in conv) for conv in sciq_conversations(split, seed=seed)]


def standin_settings(pattern: str = NANO_PATTERN, hidden: int = 64, steps: int = 300, seq_len: int = 128,
                     batch_size: int = 8, lr: float = 3e-3, seed: int = 0) -> dict[str, Any]:
    """Every setting that determines the stand-in's weights (the cache key hashes this dict)."""
    pattern_types(pattern)
    for name, v in (("hidden", hidden), ("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "steps" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'steps' else 'positive'} integer, "
                             f"got {v!r}")
    if hidden % 4:
        raise ValueError(f"hidden must be a multiple of 4 (4 attention heads), got {hidden}")
    if seq_len < 8:
        raise ValueError(f"seq_len must be at least 8 tokens, got {seq_len}")
    if not (isinstance(lr, (int, float)) and 0 < float(lr) < 1):
        raise ValueError(f"lr must be a learning rate in (0, 1), got {lr!r}")
    return {"format": _STANDIN_FORMAT, "pattern": pattern, "hidden": int(hidden), "steps": int(steps),
            "seq_len": int(seq_len), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
            "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.01), grad clip 1.0",
            "schedule": "linear warm-up over 10% of the steps, cosine decay to 10%",
            "data": "SciQ calibration pool (sciq_conversations('calibration', seed=0)) as plain text, random windows "
                    "of seq_len tokens starting with BOS", "vocab_size": 512, "experts_per_token": 2}


def _settings_hash(settings: Mapping[str, Any]) -> str:
    """Short SHA-256 of the settings (key-sorted JSON): the stand-in's cache key."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _token_stream(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """The texts joined by blank lines and tokenised once (no special tokens), as one long id tensor."""
    return torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)


def _training_windows(stream: torch.Tensor, bos: int, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` windows: BOS + ``seq_len − 1`` consecutive tokens from random offsets of ``stream``."""
    body = seq_len - 1
    if stream.numel() <= body:
        raise ValueError(f"the training text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    offs = torch.randint(0, stream.numel() - body, (n,), generator=gen)
    rows = torch.stack([stream[o:o + body] for o in offs.tolist()])
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], dim=1)


def _lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on the token windows ``x`` (every position after the first)."""
    logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), x[:, 1:])


def _write_info(folder: Path, info: dict) -> None:
    """Write the stand-in's info JSON into its (temporary) cache folder."""
    write_json(folder / STANDIN_INFO, info)


def standin_nemotron_h(pattern: str = NANO_PATTERN, hidden: int = 64, steps: int = 300, seq_len: int = 128,
                       batch_size: int = 8, lr: float = 3e-3, seed: int = 0, cache: bool = True,
                       progress: bool = True, cache_root: str | os.PathLike | None = None):
    """A NemotronH stand-in for NVIDIA-Nemotron-3-Nano-30B-A3B: ``(model, tokenizer, info)``.

    Built with :func:`cbo_utils.tiny.tiny_nemotron_h` (``pattern``, ``hidden``, ``seed``; byte-level BPE tokenizer
    from :func:`cbo_utils.tiny.build_tokenizer`; 4 routed experts, top-2, plus a shared expert) and trained for
    ``steps`` AdamW steps of plain next-token cross-entropy on ``batch_size`` random windows of ``seq_len`` tokens of
    the SciQ *calibration* pool rendered as plain text (:func:`sciq_plain_texts`), seeded and deterministic on a
    given machine. The SciQ *held-out* pool never enters training; the info records the held-out loss before and
    after training.

    With ``cache=True`` the trained model is a ``save_pretrained`` folder (plus tokenizer and ``standin_info.json``)
    at ``cache_root / "standin-nemotron-h-<hash of all settings>"`` (``cache_root`` defaults to
    :func:`cbo_utils.models.cache_dir`); a second call loads it (``info["loaded_from_cache"]``). The folder is
    written under a temporary name and renamed when complete, so an interrupted training leaves no half cache.

    ``info``: ``stand_in: true``, ``note`` (what it stands in for), ``settings``, ``settings_hash``, ``path``,
    ``loss_first``/``loss_last`` (mean of the first/last 10 training steps, fewer when
    there are fewer than 20), ``heldout_loss_untrained`` /
    ``heldout_loss_trained``, ``tokens_seen``, ``seconds``, ``parameters``.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tiny import build_tokenizer, tiny_nemotron_h

    settings = standin_settings(pattern, hidden, steps, seq_len, batch_size, lr, seed)
    h = _settings_hash(settings)
    if cache:
        from .models import cache_dir

        root = Path(cache_root) if cache_root is not None else cache_dir()
        target = root / f"{STANDIN_PREFIX}-{h}"
        if (target / STANDIN_INFO).is_file() and (target / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(target)
            model.config.cbo_stand_in_for = NANO_MODEL_ID
            info = read_json(target / STANDIN_INFO)
            info.update(loaded_from_cache=True, path=str(target))
            return model, tok, info

    t0 = time.perf_counter()
    tok = build_tokenizer()
    model, _ = tiny_nemotron_h(pattern, hidden=hidden, seed=seed, tokenizer=tok)
    model = model.float()
    stream = _token_stream(tok, sciq_plain_texts("calibration"))
    held = _token_stream(tok, sciq_plain_texts("heldout"))
    n_held = max(1, min(8, held.numel() // seq_len))
    body = seq_len - 1
    held_windows = torch.cat([torch.full((n_held, 1), tok.bos_token_id, dtype=torch.long),
                              held[: n_held * body].view(n_held, body)], dim=1)

    @torch.no_grad()
    def heldout_loss() -> float:
        """Mean next-token loss on the SciQ held-out windows (eval mode)."""
        model.eval()
        return float(_lm_loss(model, held_windows))

    loss_untrained = heldout_loss()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 10)

    def lr_at(step: int) -> float:
        """Learning rate of a step: linear warm-up, then cosine decay to 10%."""
        if step < warm:
            return lr * (step + 1) / warm
        p = (step - warm) / max(1, steps - warm)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="train stand-in", unit="step", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = _training_windows(stream, tok.bos_token_id, batch_size, seq_len, gen)
        loss = _lm_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    model.config.cbo_stand_in_for = NANO_MODEL_ID  # saved into config.json: a loaded copy says what it is
    loss_trained = heldout_loss()
    seconds = time.perf_counter() - t0
    w = max(1, min(10, len(losses) // 2))  # disjoint windows when there are at least two steps
    head, tail = losses[:w], losses[-w:]
    info = {
        "stand_in": True, "stands_in_for": NANO_MODEL_ID, "note": STANDIN_NOTE, "settings": settings,
        "settings_hash": h, "loss_first": float(np.mean(head)) if head else None,
        "loss_last": float(np.mean(tail)) if tail else None, "losses_every_10": losses[::10],
        "heldout_loss_untrained": loss_untrained, "heldout_loss_trained": loss_trained,
        "heldout_loss_windows": f"{n_held} × {seq_len} tokens of the SciQ held-out pool",
        "tokens_seen": int(steps * batch_size * seq_len), "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(steps, 1), 4), "threads": torch.get_num_threads(),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "provenance": provenance("standin_nemotron_h", settings), "loaded_from_cache": False, "path": None,
    }
    if cache:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _write_info(tmp, {**info, "path": str(target)})
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished the same stand-in first: use its copy
                if not (target / STANDIN_INFO).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info["path"] = str(target)
    return model, tok, info


# =====================================================================================================================
# evaluation
# =====================================================================================================================

@torch.no_grad()
def evaluate_windows(model, windows: torch.Tensor, removed: Sequence[int] | None = None, batch_size: int = 8
                     ) -> dict[str, float]:
    """Perplexity and next-token top-1 accuracy of ``model`` on pre-cut ``windows`` (every position after the first
    is predicted; float64 accumulation, the policy of :mod:`cbo_utils.evaluate`). With ``removed`` the model is
    evaluated gated (α = 0 on those blocks), which equals the physically pruned model."""
    from .models import model_device

    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a (n, seq_len ≥ 2) tensor of token ids, got shape {tuple(windows.shape)}")
    dev = model_device(model)
    nll, correct, count = 0.0, 0, 0
    with contextlib.ExitStack() as stack:
        if removed:
            gates = stack.enter_context(Gates(model))
            stack.enter_context(gates.removed(list(removed)))
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i:i + batch_size].to(dev)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
            logits = logits if logits.dtype == torch.float64 else logits.float()
            target = x[:, 1:].to(logits.device)
            nll += float(F.cross_entropy(logits.transpose(1, 2), target, reduction="sum").double())
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "accuracy": correct / count, "tokens": count}


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


# =====================================================================================================================
# the experiment
# =====================================================================================================================

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


def _read_table(path: Path) -> pd.DataFrame:
    """An evaluations table with its text columns kept as text ("12" stays "12", never 12.0)."""
    if not path.is_file():
        return pd.DataFrame()
    return pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS}, keep_default_na=False,
                       na_values={c: [""] for c in _NUMBER_COLUMNS})


def _upsert(path: Path, rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Add ``rows`` to the evaluations CSV, replacing rows with the same :data:`EVAL_KEY`; atomic write."""
    old = _read_table(path)
    new = pd.DataFrame([dict(r) for r in rows])
    cols = list(dict.fromkeys(EVAL_COLUMNS + list(old.columns) + list(new.columns)))
    both = (pd.concat([old.reindex(columns=cols), new.reindex(columns=cols)], ignore_index=True) if len(old)
            else new.reindex(columns=cols))
    for c in ("stand_in", "rerank_pick"):  # booleans stay True/False through the CSV round trips
        if c in both:
            both[c] = both[c].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) or v == ""
                                  else str(v).strip().lower() in ("true", "1", "1.0"))
    key = both[EVAL_KEY].fillna("").astype(str).agg("|".join, axis=1)
    out = both[~key.duplicated(keep="last")].reset_index(drop=True)
    out["rank"] = pd.to_numeric(out["rank"], errors="coerce").astype("Int64")
    atomic_write_text(path, out.to_csv(index=False, float_format="%.17g", lineterminator="\n"))
    return out


def _removed_types(types: Sequence[str], blocks: Sequence[int]) -> str:
    """Pattern letters of the removed blocks, in block order (``[1, 5]`` of the Nano pattern → ``"E*"``)."""
    return "".join(_TYPE_LETTER.get(types[b], "?") for b in sorted(blocks))


def run_hybrid_experiment(model, tokenizer, calibration, eval_texts_or_windows, budgets: Sequence[Mapping | str], *,
                          out_dir, stand_in: bool, k: int = 10, model_name: str | None = None,
                          rerank_calibration=None, energy: str = "fisher", gradient_batch_size: int = 8,
                          random_removal: tuple[int, int] | None = None, points_per_sample: int = 1, seed: int = 0,
                          eval_seq_len: int = 256, eval_windows: int = 16, eval_batch_size: int = 8,
                          eval_source: str = "", block_influence: Sequence[str] = ("one_shot", "iterative"),
                          bi_batch_size: int = 8, keep: Iterable[int] = (), notes: Sequence[str] = (),
                          progress: bool = True) -> dict[str, Any]:
    """Type-restricted CBO vs block influence on one model, evaluated on held-out text; resumable.

    1. **gradients** — per-sample gate gradients on ``calibration`` (:func:`cbo_utils.hessian.collect_gate_gradients`):
       the paper's recipe at α = 1 by default; ``random_removal=(lo, hi)`` with ``points_per_sample`` gives the
       stochastic-depth rows (each at a random partial removal) that this package found much better on SmolLM2.
       Saved as ``out_dir/gradients.safetensors`` (+ sidecar) and reused when the model, calibration and options
       match.
    2. **states** — Fisher ``H = AᵀA/m`` (``energy="taylor"``: ``−gᵀx + ½xᵀHx``); for each budget the ``k`` lowest
       states, exactly (:func:`exact_lowest_by_type`) → ``hybrid_states.csv``. With ``rerank_calibration`` (windows
       disjoint from ``calibration`` and from the evaluation text) each state also gets its cross-entropy there
       (``rerank_ce``): the predeclared re-ranking rule picks the lowest.
    3. **block influence** — :func:`block_influence_by_type` per budget, one-shot and/or iterative
       (``block_influence``), on the calibration windows (plus ``rerank_calibration``: every method sees the same
       tokens).
    4. **evaluate** — perplexity and next-token top-1 accuracy (:func:`evaluate_windows`) on held-out windows
       (``eval_texts_or_windows``: a ``(n, seq_len)`` tensor, or texts cut by
       :func:`cbo_utils.evaluate.perplexity_windows` into ``eval_windows × eval_seq_len``) of the dense model, every
       state (method ``cbo:<rank>``) and every BI selection, on the gated model (α = 0 on removed blocks, equal to
       physical removal). Retention: ``accuracy / dense accuracy`` and ``dense perplexity / perplexity``. Rows go to
       ``hybrid_evaluations.csv`` as they are measured; a row already there (same model weights, evaluation windows,
       budget, method and removed blocks) is not recomputed.
    5. **report** — ``hybrid.md``; its first line says when the model is a stand-in (``stand_in=True``), as does
       the ``stand_in`` column of both tables.

    Returns ``{"states": DataFrame, "evaluations": DataFrame, "paths": {...}, "gradients": GradientResult}``.
    """
    from .blocks import block_types
    from .evaluate import perplexity_windows
    from .hessian import GRADIENTS_FILE, collect_gate_gradients, load_gradients
    from .ising import quadratic_form

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budgets_n = [normalise_budget(b) for b in budgets]
    if not budgets_n:
        raise ValueError("give at least one budget, e.g. [{'moe': 3}]")
    labels = [budget_label(b) for b in budgets_n]
    if len(set(labels)) != len(labels):
        raise ValueError(f"budgets are listed more than once: {labels}")
    bad_bi = [m for m in block_influence if m not in ("one_shot", "iterative")]
    if bad_bi:
        raise ValueError(f"block_influence entries must be 'one_shot' or 'iterative', got {bad_bi}")
    if energy not in ("fisher", "taylor"):
        raise ValueError(f"energy must be 'fisher' or 'taylor', got {energy!r}")
    types = block_types(model)
    keep = tuple(sorted(int(b) for b in keep))
    for b in budgets_n:
        _check_budget(types, b, keep)
    model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    model.eval()
    fingerprint = _model_fingerprint(model)

    if isinstance(eval_texts_or_windows, torch.Tensor):
        windows = eval_texts_or_windows.to(torch.long)
    else:
        windows = perplexity_windows(tokenizer, list(eval_texts_or_windows), seq_len=eval_seq_len,
                                     windows=eval_windows)
    eval_id = _windows_id(windows)
    calib_sha = calibration.sha256 if hasattr(calibration, "sha256") else ""

    # ---- 1. gradients (cached)
    grad_file = out_dir / GRADIENTS_FILE
    gparams = {"model": model_name, "model_fingerprint": fingerprint, "calibration_sha256": calib_sha,
               "random_removal": list(random_removal) if random_removal else None,
               "points_per_sample": points_per_sample, "seed": seed, "batch_size": gradient_batch_size}
    if grad_file.is_file() and sidecar_path(grad_file).is_file() and \
            read_json(sidecar_path(grad_file)).get("parameters") == gparams:
        grads = load_gradients(grad_file)
    else:
        kw = {"random_removal": tuple(random_removal), "points_per_sample": points_per_sample, "seed": seed} \
            if random_removal else {}
        grads = collect_gate_gradients(model, calibration, batch_size=gradient_batch_size, progress=progress,
                                       checkpoint=out_dir / "gradients.partial", **kw)
        grads.save(grad_file, provenance("gate_gradients", gparams, stand_in=stand_in))
    Q, const = quadratic_form(grads.H.numpy(), grads.g.numpy() if energy == "taylor" else None, energy)

    # ---- 2. states per budget (cheap and deterministic: always recomputed)
    state_frames, solver_infos = [], {}
    for b, label in zip(budgets_n, labels, strict=True):
        df = exact_lowest_by_type(Q, types, b, k=k, const=const, energy=energy, keep=keep)
        solver_infos[label] = df.attrs["solver_info"]
        df.insert(0, "budget", label)
        df.insert(0, "stand_in", bool(stand_in))
        df.insert(0, "model", model_name)
        df["removed_types"] = [_removed_types(types, parse_blocks(s)) for s in df["removed_blocks"]]
        df["n_states"] = solver_infos[label]["n_states"]
        if rerank_calibration is not None:
            from .variants import calibration_scores

            sets = [parse_blocks(s) for s in df["removed_blocks"]]
            df["rerank_ce"] = calibration_scores(model, sets, rerank_calibration, "ce", progress=False)
            pick = int(df.sort_values(["rerank_ce", "rank"]).iloc[0]["rank"])
            df["rerank_pick"] = df["rank"] == pick
        state_frames.append(df)
    states = pd.concat(state_frames, ignore_index=True)
    states_path = out_dir / STATES_FILE
    atomic_write_text(states_path, states.to_csv(index=False, float_format="%.17g", lineterminator="\n"))
    write_sidecar(states_path, provenance(
        "hybrid_states", {"budgets": labels, "k": k, "energy": energy, "keep": list(keep),
                          "model": model_name, "stand_in": stand_in},
        inputs={"gradients": grad_file}, solver_info=solver_infos,
        note=STANDIN_NOTE if stand_in else None))

    # ---- 3./4. evaluations (resumable)
    eval_path = out_dir / EVALUATIONS_FILE
    old = _read_table(eval_path)
    if len(old):
        stale = (old["model"].astype(str) == model_name) & ((old["model_fingerprint"].astype(str) != fingerprint) |
                                                             (old["eval_id"].astype(str) != eval_id))
        if stale.any():
            print(f"[hybrid] dropping {int(stale.sum())} evaluation rows of other weights or evaluation windows")
            keep_rows = old[~stale]
            atomic_write_text(eval_path, keep_rows.to_csv(index=False, lineterminator="\n"))
    base = {"model": model_name, "stand_in": bool(stand_in), "eval_source": eval_source, "eval_id": eval_id,
            "model_fingerprint": fingerprint, "calibration_sha256": calib_sha}

    def done_row(budget: str, method: str, removed: str | None = None) -> dict | None:
        """The recorded evaluation of (budget, method[, removed blocks]) for these weights and windows, or None."""
        tab = _read_table(eval_path)
        if not len(tab):
            return None
        sel = tab[(tab["model"].astype(str) == model_name) & (tab["model_fingerprint"].astype(str) == fingerprint)
                  & (tab["eval_id"].astype(str) == eval_id) & (tab["budget"].astype(str) == budget)
                  & (tab["method"].astype(str) == method)]
        if removed is not None:
            sel = sel[sel["removed_blocks"].astype(str) == removed]
        return sel.iloc[0].to_dict() if len(sel) else None

    def measure(budget: str, method: str, removed: list[int], extra: dict) -> dict:
        """Evaluate one removal (gated), add retentions, append the row to the table at once."""
        t0 = time.perf_counter()
        r = evaluate_windows(model, windows, removed=removed or None, batch_size=eval_batch_size)
        row = {**base, "budget": budget, "method": method, "removed_blocks": format_blocks(removed),
               "removed_types": _removed_types(types, removed), "perplexity": r["perplexity"],
               "accuracy": r["accuracy"], "nll": r["nll"], "tokens": r["tokens"],
               "seconds": round(time.perf_counter() - t0, 3), **extra}
        if dense is not None:
            row["ppl_retention"] = dense["perplexity"] / r["perplexity"]
            row["accuracy_retention"] = r["accuracy"] / dense["accuracy"] if dense["accuracy"] > 0 else float("nan")
        _upsert(eval_path, [row])
        return row

    dense = None
    dense = done_row("", "dense") or measure("", "dense", [], {"rank": None, "energy": None, "ppl_retention": 1.0,
                                                                 "accuracy_retention": 1.0})
    bi_calib = calibration
    if rerank_calibration is not None:
        from .calibration import CalibrationSet

        bi_calib = CalibrationSet(list(calibration) + list(rerank_calibration),
                                  {**getattr(calibration, "recipe", {}), "part": "gradient + re-rank windows"})
    jobs: list[tuple[str, str, list[int] | None, dict]] = []
    for b, label in zip(budgets_n, labels, strict=True):
        sub = states[states["budget"] == label]
        for _, r in sub.iterrows():
            jobs.append((label, f"cbo:{int(r['rank'])}", parse_blocks(r["removed_blocks"]),
                         {"rank": int(r["rank"]), "energy": float(r["energy"]),
                          **({"rerank_ce": float(r["rerank_ce"]), "rerank_pick": bool(r["rerank_pick"])}
                             if "rerank_ce" in r else {})}))
        for kind in block_influence:
            jobs.append((label, "block_influence" if kind == "one_shot" else "block_influence_iterative", None,
                         {"budget_dict": b}))
    from tqdm.auto import tqdm

    for label, method, removed, extra in tqdm(jobs, desc="hybrid evaluations", unit="model", disable=not progress):
        if removed is None:  # a block-influence selection: reuse the recorded one when resuming
            prev = done_row(label, method)
            if prev is not None and str(prev.get("calibration_sha256")) == calib_sha:
                continue
            sel = block_influence_by_type(model, bi_calib, extra.pop("budget_dict"), batch_size=bi_batch_size,
                                          iterative=method.endswith("iterative"), keep=keep)
            removed = sel.removed
            extra = {"rank": None, "energy": float(removed_energy(Q, const, removed)),
                     "selection_seconds": round(sel.seconds, 3), "relative_blocks": " ".join(map(str, sel.relative))
                     if sel.relative else ""}
        elif done_row(label, method, format_blocks(removed)) is not None:
            continue
        measure(label, method, removed, extra)

    evaluations = _read_table(eval_path)
    evaluations = evaluations[(evaluations["model"].astype(str) == model_name)
                              & (evaluations["model_fingerprint"].astype(str) == fingerprint)
                              & (evaluations["eval_id"].astype(str) == eval_id)].reset_index(drop=True)
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


def removed_energy(Q: np.ndarray, const: float, removed: Sequence[int]) -> float:
    """``xᵀQx + const`` of the state removing ``removed`` (to place a baseline's choice on the energy scale)."""
    x = np.zeros(Q.shape[0])
    x[list(removed)] = 1.0
    return float(x @ Q @ x + const)


def _fmt(x, digits: int = 4) -> str:
    """A table cell: ``—`` for missing values, ``digits`` significant digits for floats."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, (float, np.floating)):
        return f"{x:.{digits}g}"
    return str(x)


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


def _markdown(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (cells through :func:`_fmt`)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def write_hybrid_report(out_dir, evaluations: pd.DataFrame, states: pd.DataFrame, *, model_name: str, stand_in: bool,
                        settings: Mapping[str, Any], notes: Sequence[str] = ()) -> Path:
    """Write ``hybrid.md``: a stand-in warning as the FIRST line when ``stand_in``, the settings, one table per
    budget (:func:`summary_table`) and Spearman ρ(energy, held-out log-perplexity) over each budget's k states."""
    from .variants import spearman

    out_dir = Path(out_dir)
    lines = []
    if stand_in:
        lines.append(f"**STAND-IN MODEL — not {NANO_MODEL_ID}.** {STANDIN_NOTE}")
        lines.append("")
    lines += [f"# Type-restricted block removal: CBO vs block influence — `{model_name}`", ""]
    cal = settings.get("calibration") or {}
    lines += [
        f"Generated by `cbo_utils.hybrid`. Gradients: {settings.get('gradient_rows')} rows on "
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
        lines += [f"## Budget `{label}` ({n_states:,} feasible states)", "", _markdown(sub), ""]
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
                  _markdown(pd.DataFrame(rho_rows)), ""]
    if stand_in:
        lines += ["_Every row above comes from the stand-in model (column `stand_in` = True in the CSV tables). "
                  f"The paper's Nemotron result (Fig. 5, v1: {NANO_MODEL_ID}-FP8, 2 / 3 MoE blocks removed, GPQA and "
                  "AIME25) is not comparable with these numbers._", ""]
    path = atomic_write_text(out_dir / REPORT_FILE, "\n".join(lines) + "\n")
    write_sidecar(path, provenance("hybrid_report", dict(settings), stand_in=stand_in,
                                   inputs={"evaluations": out_dir / EVALUATIONS_FILE}))
    return path


# =====================================================================================================================
# profile settings and command line
# =====================================================================================================================

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
    unknown = sorted(set(section) - set(HYBRID_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown keys in the profile's hybrid: section: {unknown}; known keys: "
                         f"{sorted(HYBRID_DEFAULTS)}")
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
    from .calibration import heldout_text

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
    from .calibration import CalibrationSet, embedded
    from .pipeline import profile_with

    t0 = time.perf_counter()
    cfg = profile_with(profile, "hybrid", hybrid)
    s = hybrid_settings(cfg)
    if s["threads"]:
        torch.set_num_threads(int(s["threads"]))
    results = Path(results) if results else ROOT / "results" / cfg.get("profile", str(profile))
    out_dir = results / "hybrid"
    if s["model"] == "standin":
        model, tok, info = standin_nemotron_h(s["pattern"], s["hidden"], s["train_steps"], s["train_seq_len"],
                                              s["train_batch_size"], s["train_lr"], s["seed"], progress=progress)
        stand_in, name = True, f"{STANDIN_PREFIX}-{info['settings_hash']}"
        print(f"[hybrid] stand-in {name}: {'loaded from cache' if info['loaded_from_cache'] else 'trained'} "
              f"({info['seconds']:.0f} s training, loss {info['loss_first']:.3f} → {info['loss_last']:.3f}, held-out "
              f"{info['heldout_loss_untrained']:.3f} → {info['heldout_loss_trained']:.3f})", flush=True)
    else:
        from .models import load_model

        model, tok = load_model(s["model"], dtype=cfg.get("dtype", "float32"), device_map=cfg.get("device_map"))
        stand_in, name, info = False, s["model"], {"stand_in": False, "path": s["model"]}
    n_total = s["calibration_samples"] + s["rerank_samples"]
    if s["calibration"] in (None, "embedded"):
        calib_all = embedded(tok, samples=n_total, max_tokens=s["calibration_max_tokens"], seed=0,
                             chat=bool(s["calibration_chat"]))
    elif s["calibration_max_length"] and (s["calibration"] == "openhermes" or s["calibration"].startswith("hf:")):
        from .calibration import OPENHERMES, from_hf_dataset

        name = OPENHERMES if s["calibration"] == "openhermes" else s["calibration"].partition(":")[2]
        calib_all = from_hf_dataset(tok, name, samples=n_total, seed=42, max_tokens=s["calibration_max_tokens"],
                                    max_length=s["calibration_max_length"],
                                    enable_thinking=True if s["calibration_chat"] and "qwen3" in name.lower() else None)
    else:
        from .calibration import load_calibration

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
    from .lmeval import evaluate_checkpoint

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


def prune_selections(evaluations: pd.DataFrame, src_dir, out_root, methods: Sequence[str] = ("cbo:0",
                     "block_influence"), source: str | None = None, overwrite: bool = False) -> list[Path]:
    """Prune the checkpoint folder ``src_dir`` (same blocks as the model the selections were made on — e.g. the
    FP8 checkpoint when the selections come from the BF16 one) with each budget's selection by each of ``methods``
    (``cbo:<rank>``, ``block_influence``, ``block_influence_iterative``), using :func:`prune_checkpoint_files`.
    Folders are ``out_root/<budget>__<method>`` (``moe-3__cbo0``); one that already holds the same removal is kept.
    The types of the removed blocks are checked against the checkpoint's own layout."""
    src_dir, out_root = Path(src_dir), Path(out_root)
    n, types, _ = _layout_from_config(read_json(src_dir / "config.json"))
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
    """``python -m cbo_utils.hybrid --profile tiny|mini [--results DIR]``: the type-restricted experiment of a
    profile (the Nemotron stand-in unless the profile's ``hybrid.model`` names a real checkpoint)."""
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


# =====================================================================================================================
# pruning checkpoint files without loading the model
# =====================================================================================================================

_LAYER_NAME = re.compile(r"^((?:[^.]+\.)*?layers)\.(\d+)\.(.+)$")
_LAYER_REF = re.compile(r"(?<![A-Za-z0-9_])layers(\\?\.)(\d+)(?![0-9])")
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _layout_from_config(config: Mapping[str, Any]) -> tuple[int, list[str], bool]:
    """``(N, block types, hybrid)`` from a ``config.json`` dict (native or remote-code NemotronH, decoder models)."""
    lbt = config.get("layers_block_type")
    if isinstance(lbt, list) and lbt:
        unknown = sorted({t for t in lbt if t not in _NATIVE_TYPES and t not in _TYPE_LETTER})
        if unknown:
            raise ValueError(f"config.json layers_block_type has unknown layer types {unknown}")
        return len(lbt), [_NATIVE_TYPES.get(t, t) for t in lbt], True
    pattern = config.get("hybrid_override_pattern")
    if isinstance(pattern, str) and pattern:
        return len(pattern), pattern_types(pattern), True
    n = config.get("num_hidden_layers")
    if isinstance(n, int) and n > 0:
        return n, ["decoder"] * n, False
    raise ValueError("config.json has neither layers_block_type, hybrid_override_pattern nor num_hidden_layers: "
                     "cannot tell how many blocks the checkpoint has (nested text_config checkpoints are not "
                     "supported)")


def _check_remove_list(remove, n: int, types: Sequence[str], hybrid: bool) -> list[int]:
    """Validate a removal set against a checkpoint's layout (the rules of :func:`cbo_utils.blocks.check_removal`)."""
    if isinstance(remove, str):
        remove = parse_blocks(remove)
    remove = list(remove)
    bad = [b for b in remove if isinstance(b, bool) or not isinstance(b, (int, np.integer))]
    if bad:
        raise RemovalError(f"block indices must be integers, got {bad!r}")
    remove = [int(b) for b in remove]
    out = sorted({b for b in remove if not 0 <= b < n})
    if out:
        raise RemovalError(f"block indices {out} are out of range: the checkpoint has {n} blocks, numbered 0..{n - 1}")
    dup = sorted({b for b in remove if remove.count(b) > 1})
    if dup:
        raise RemovalError(f"block indices {dup} are listed more than once")
    if not remove:
        raise RemovalError("nothing to remove: give at least one block index")
    if len(remove) >= n:
        raise RemovalError(f"removing all {n} blocks leaves no model; remove at most {n - 1}")
    att = [i for i, t in enumerate(types) if t == ATTENTION]
    if hybrid and att and not set(att) - set(remove):
        raise RemovalError(f"this removal takes out every attention block {att} of a hybrid model; at least one must "
                           "remain (cached generation needs it)")
    return sorted(remove)


def remap_layer_references(obj: Any, kept: Sequence[int], n_original: int, record: dict | None = None) -> Any:
    """A copy of a JSON-like ``obj`` (e.g. a ``quantization_config``) in which every module name that contains
    ``layers.<i>`` (also the regex form ``layers\\.<i>``) refers to the pruned model: names of removed layers are
    dropped (from lists, and dict entries whose key or string value names one), names of kept layers renumbered.
    Strings that mention ``mtp`` (NemotronH's multi-token-prediction layers, numbered separately) and indices
    ≥ ``n_original`` are left unchanged. ``record`` (a dict) collects ``dropped``, ``renamed`` and ``unchanged``."""
    new_of = {old: new for new, old in enumerate(kept)}
    rec = record if record is not None else {}
    for key in ("dropped", "renamed", "unchanged"):
        rec.setdefault(key, [])
    DROP = object()

    def fix(s: str):
        """One string: unchanged, renumbered, or DROP when it names a removed layer."""
        if "mtp" in s.lower():
            if _LAYER_REF.search(s):
                rec["unchanged"].append(s)
            return s
        hits = list(_LAYER_REF.finditer(s))
        if not hits:
            return s
        idx = [int(m.group(2)) for m in hits]
        if any(i >= n_original for i in idx):
            rec["unchanged"].append(s)
            return s
        if any(i not in new_of for i in idx):
            rec["dropped"].append(s)
            return DROP
        new = _LAYER_REF.sub(lambda m: f"layers{m.group(1)}{new_of[int(m.group(2))]}", s)
        if new != s:
            rec["renamed"].append([s, new])
        return new

    def walk(o):
        """Rebuild lists and dicts, dropping entries that name removed layers."""
        if isinstance(o, str):
            return fix(o)
        if isinstance(o, list):
            out = [walk(v) for v in o]
            return [v for v in out if v is not DROP]
        if isinstance(o, dict):
            out = {}
            for k, v in o.items():
                nk = fix(k) if isinstance(k, str) else k
                nv = walk(v)
                if nk is DROP or nv is DROP:
                    continue
                out[nk] = nv
            return out
        return o

    res = walk(obj)
    return None if res is DROP else res


def prune_config_dict(config: Mapping[str, Any], kept: Sequence[int], n_original: int,
                      removed: Sequence[int] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``config.json`` dict of the pruned checkpoint, and a record of what changed.

    Mirrors the in-memory path (:meth:`cbo_utils.blocks.Adapter.rewrite_config` and ``config_json_extras``):
    ``layers_block_type`` / ``layer_types`` filtered, ``hybrid_override_pattern`` filtered (and written, with
    ``num_hidden_layers``, for native NemotronH configs, as vLLM reads them), ``num_hidden_layers`` = kept count,
    ``max_window_layers`` recounted, ``mlp_only_layers`` / ``no_rope_layers`` remapped (flag lists filtered, index
    lists renumbered), any other list field whose name contains ``layer`` with one non-integer entry per layer
    filtered, ``quantization_config`` remapped by :func:`remap_layer_references`, and ``cbo_removed_blocks`` extended
    (cumulative, in indices of the first model).
    """
    from .blocks import _PATTERN_LETTER

    cfg = json.loads(json.dumps(config))
    kept = list(kept)
    rec: dict[str, Any] = {"fields": []}
    native = isinstance(cfg.get("layers_block_type"), list)
    for name in ("layers_block_type", "layer_types"):
        v = cfg.get(name)
        if isinstance(v, list) and len(v) == n_original:
            cfg[name] = [v[i] for i in kept]
            rec["fields"].append(name)
    pat = cfg.get("hybrid_override_pattern")
    if isinstance(pat, str) and len(pat) == n_original:
        cfg["hybrid_override_pattern"] = "".join(pat[i] for i in kept)
        rec["fields"].append("hybrid_override_pattern")
    elif native:
        cfg["hybrid_override_pattern"] = "".join(_PATTERN_LETTER[_NATIVE_TYPES.get(t, t)]
                                                 for t in cfg["layers_block_type"])
        rec["fields"].append("hybrid_override_pattern (written for vLLM)")
    cfg["num_hidden_layers"] = len(kept)
    rec["fields"].append("num_hidden_layers")
    mwl = cfg.get("max_window_layers")
    if isinstance(mwl, int) and not isinstance(mwl, bool):
        cfg["max_window_layers"] = sum(1 for i in kept if i < mwl)
        rec["fields"].append("max_window_layers")
    new_of = {old: new for new, old in enumerate(kept)}
    for name in ("mlp_only_layers", "no_rope_layers"):
        v = cfg.get(name)
        if not isinstance(v, list) or not v:
            continue
        if len(v) == n_original and n_original > 1 and all(isinstance(x, (bool, int)) and x in (0, 1) for x in v):
            cfg[name] = [v[i] for i in kept]
        else:
            cfg[name] = [new_of[x] for x in v if x in new_of]
        rec["fields"].append(name)
    handled = {"layers_block_type", "layer_types", "mlp_only_layers", "no_rope_layers"}
    for name, v in list(cfg.items()):
        if (name not in handled and "layer" in name.lower() and isinstance(v, list) and len(v) == n_original
                and not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            cfg[name] = [v[i] for i in kept]
            rec["fields"].append(name)
    for name in ("quantization_config", "compression_config"):
        if isinstance(cfg.get(name), dict):
            qrec: dict[str, Any] = {}
            cfg[name] = remap_layer_references(cfg[name], kept, n_original, qrec)
            rec[name] = qrec
    prev = list(cfg.get("cbo_removed_blocks") or [])
    removed = sorted(int(b) for b in removed)
    if prev:
        orig_kept = [i for i in range(n_original + len(prev)) if i not in set(prev)]
        removed = sorted(set(prev) | {orig_kept[i] for i in removed})
    cfg["cbo_removed_blocks"] = removed
    return cfg, rec


def prune_checkpoint_files(src_dir, remove, out_dir, *, overwrite: bool = False, method: str = "manual",
                           energy: float | None = None, source: str | None = None,
                           extra: Mapping[str, Any] | None = None) -> Path:
    """Remove blocks ``remove`` (0-based) from the checkpoint folder ``src_dir`` WITHOUT loading the model, into
    ``out_dir``; returns ``out_dir``.

    - weights: the safetensors file(s) — ``model.safetensors`` or the shards of ``model.safetensors.index.json`` —
      are read one at a time; tensors of removed layers are dropped and the layer index in the names of kept layers
      renumbered (``model.layers.{i}.``, ``backbone.layers.{i}.``, any ``<prefix>.layers.{i}.`` whose indices cover
      exactly 0..N−1; other numbered stacks such as NemotronH's ``mtp.layers`` are left alone). Dtypes (FP8 included)
      and per-shard metadata are kept; the index is rewritten (``total_size``, ``total_parameters``), shards that
      become empty are dropped and the rest renumbered. Pickled weights (``*.bin``) are never read.
    - ``config.json``: :func:`prune_config_dict` (layer pattern fields, ``num_hidden_layers``, per-layer lists, and
      the per-layer module names of ``quantization_config``, e.g. ``ignore`` / ``modules_to_not_convert`` lists, so
      an FP8 checkpoint's quantisation metadata follows the removal); ``hf_quant_config.json`` (ModelOpt) likewise.
    - every other file (tokenizer, chat template, generation config, remote code, licence) is copied; the source
      ``README.md`` is kept as ``SOURCE_README.md`` next to a new model card.
    - ``removed_blocks.json`` (the record :func:`cbo_utils.export.verify_export` reads) holds the removal, what was
      rewritten and the provenance.

    The folder is written under a temporary name and renamed at the end.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .export import _model_card

    src, out_dir = Path(src_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: give a save_pretrained checkpoint folder")
    if out_dir.resolve() == src.resolve():
        raise ValueError("out_dir must differ from src_dir (the source checkpoint is never modified)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another folder or pass overwrite=True")
    config = read_json(src / "config.json")
    n, types, hybrid = _layout_from_config(config)
    remove = _check_remove_list(remove, n, types, hybrid)
    kept = [i for i in range(n) if i not in set(remove)]
    new_of = {old: new for new, old in enumerate(kept)}

    if (src / _INDEX).is_file():
        index = read_json(src / _INDEX)
        weight_map: dict[str, str] = index["weight_map"]
        shards = list(dict.fromkeys(sorted(weight_map.values())))
    elif (src / _SINGLE).is_file():
        index, weight_map, shards = None, None, [_SINGLE]
    else:
        found = sorted(p.name for p in src.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        raise FileNotFoundError(f"{src} has no model.safetensors or {_INDEX}" + (
            f" (found {found}: pickled weights are never read; convert them to safetensors first)" if found else ""))

    names_by_shard: dict[str, list[str]] = {}
    for shard in shards:
        with safe_open(str(src / shard), framework="pt") as f:
            names_by_shard[shard] = list(f.keys())
    prefixes: dict[str, set[int]] = {}
    for names in names_by_shard.values():
        for name in names:
            m = _LAYER_NAME.match(name)
            if m:
                prefixes.setdefault(m.group(1), set()).add(int(m.group(2)))
    main_prefixes = [p for p, idx in prefixes.items() if idx == set(range(n))]
    if len(main_prefixes) != 1:
        raise ValueError(f"cannot find the block stack in the tensor names: the config says {n} blocks but the "
                         f"numbered prefixes are { {p: (min(i), max(i), len(i)) for p, i in prefixes.items()} }")
    prefix = main_prefixes[0]

    def rename(name: str) -> str | None:
        """The tensor's name in the pruned checkpoint, or None when its layer is removed."""
        m = _LAYER_NAME.match(name)
        if not m or m.group(1) != prefix:
            return name
        i = int(m.group(2))
        return None if i not in new_of else f"{prefix}.{new_of[i]}.{m.group(3)}"

    new_config, cfg_rec = prune_config_dict(config, kept, n, remove)
    with atomic_folder(out_dir) as tmp:
        written: list[tuple[str, dict[str, str]]] = []  # (temporary shard name, {new tensor name: shard})
        total_size = total_params = 0
        n_dropped = 0
        for j, shard in enumerate(shards):
            tensors, meta = {}, None
            with safe_open(str(src / shard), framework="pt") as f:
                meta = f.metadata()
                for name in names_by_shard[shard]:
                    new = rename(name)
                    if new is None:
                        n_dropped += 1
                        continue
                    t = f.get_tensor(name)
                    tensors[new] = t
                    total_size += t.numel() * t.element_size()
                    total_params += t.numel()
            if tensors:
                part = f".part-{j:05d}.safetensors"
                save_file(tensors, str(tmp / part), metadata=meta)
                written.append((part, {name: part for name in tensors}))
        if index is None:
            os.replace(tmp / written[0][0], tmp / _SINGLE)
            final_shards = [_SINGLE]
        else:
            same = len(written) == len(shards)
            final_shards = []
            new_map: dict[str, str] = {}
            kept_src = [s for s in shards if any(rename(x) is not None for x in names_by_shard[s])]
            for j, (part, names) in enumerate(written):
                final = kept_src[j] if same else f"model-{j + 1:05d}-of-{len(written):05d}.safetensors"
                os.replace(tmp / part, tmp / final)
                final_shards.append(final)
                new_map.update({name: final for name in names})
            meta_idx = dict(index.get("metadata") or {})
            meta_idx["total_size"] = total_size
            if "total_parameters" in meta_idx:
                meta_idx["total_parameters"] = total_params
            write_json(tmp / _INDEX, {"metadata": meta_idx, "weight_map": dict(sorted(new_map.items()))})
        write_json(tmp / "config.json", new_config)
        quant_rec = None
        skipped = []
        for p in sorted(src.iterdir()):
            if p.name in set(shards) | {_INDEX, "config.json", "removed_blocks.json", "verification.json"}:
                continue
            if p.name == "hf_quant_config.json":
                quant_rec = {}
                write_json(tmp / p.name, remap_layer_references(read_json(p), kept, n, quant_rec))
            elif p.suffix in _WEIGHT_SUFFIXES or p.name.endswith(".safetensors"):
                skipped.append(p.name)
            elif p.name == "README.md":
                shutil.copy2(p, tmp / "SOURCE_README.md")
            elif p.is_dir():
                shutil.copytree(p, tmp / p.name)
            else:
                shutil.copy2(p, tmp / p.name)
        record = {
            "removed_blocks": remove, "kept_blocks": kept, "index_base": 0, "num_blocks_original": n,
            "num_blocks_pruned": len(kept), "removed_block_types": [types[i] for i in remove], "method": method,
            "energy": energy, "source_model": source or str(src), "parameters_pruned": total_params,
            "pruned_from_files": True, "tensor_prefix": prefix, "tensors_dropped": n_dropped,
            "shards": final_shards, "config_rewrite": cfg_rec, "hf_quant_config": quant_rec,
            "skipped_files": skipped,
            "provenance": provenance("pruned_checkpoint_files", {"remove": remove, "method": method},
                                     inputs={"config": src / "config.json"}, **dict(extra or {})),
        }
        write_json(tmp / "removed_blocks.json", record)
        atomic_write_text(tmp / "README.md", _model_card(record, (config.get("architectures") or ["?"])[0]))
    return out_dir


if __name__ == "__main__":
    sys.exit(main())
