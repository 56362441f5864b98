"""The paper's figures, drawn from result files only (CSV/JSON the stages already wrote): they rerun in seconds.

=========================  ============================================  =========================================
paper item                 function                                      file (named by content)
=========================  ============================================  =========================================
Fig. 1   method sketch     :func:`draw_method`                           ``method__<model>__M<M>.png``
                                                                         (hybrid: ``method__<model>__<budget>.png``)
Fig. 2   energy vs score   :func:`draw_energy_vs_zero_shot`              ``energy_vs_zero_shot__<model>.png``
Fig. 3   energy vs ppl     :func:`draw_energy_vs_perplexity`             ``energy_vs_perplexity__<model>.png``
Fig. 4   states map        :func:`draw_states_map`                       ``states_map__<model>[__<variant>]__M<M>.png``
Fig. 5   hybrid retention  :func:`draw_hybrid_retention`                 ``hybrid_retention__<model>.png``
=========================  ============================================  =========================================

:data:`FIGURES` is the figure registry: a new figure is one draw function and one planner decorated with
:func:`register_figure` (which files it draws from which inputs). :func:`draw_all` draws every figure whose inputs exist
under a results folder (``results/<profile>``), skips and reports the rest, and writes ``figures.json`` (figure → paper
item, input files and their SHA-256, notes; no timestamps).
``python -m cbo_utils.report.figures --results results/mini --out figures/mini``.

Every draw function takes paths or DataFrames and an output folder, and returns a :class:`Drawn`: the written path
(None when there was nothing to draw) and the data it plotted, so tests can check the picture against the inputs.
Figures are deterministic (Agg, matplotlib's default style, fixed size and dpi, no ``Software`` metadata): the same
inputs give byte-identical PNGs; each is written atomically. Block indices are 0-based, as in every result file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: no display, deterministic rendering

import matplotlib.style  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from cbo_utils.core.artifacts import (  # noqa: E402
    atomic_write_bytes,
    claim_folder,
    file_sha256,
    format_blocks,
    parse_blocks,
    portable_path,
    read_json,
    read_manifest,
    remove_recorded,
    write_json,
)
from cbo_utils.core.profiles import load_profile
from cbo_utils.evaluate.lmeval import ZERO_SHOT_METRIC
from cbo_utils.model.blocks import PATTERN_LETTER, pattern_types
from cbo_utils.model.standin import NANO_MODEL_ID
from cbo_utils.problem.energies import get_energy
from cbo_utils.select.cbo import get_variant, spearman

DPI = 150  # fixed: figure sizes below are in inches, so pixel sizes are fixed too

# Okabe & Ito (2008), the colour-blind-safe palette
BLUE, ORANGE, GREEN, VERMILLION, SKY, PINK, YELLOW, BLACK, GREY = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#F0E442", "#000000", "#999999")
TYPE_COLOURS = {"decoder": SKY, "mamba": BLUE, "moe": ORANGE, "attention": GREEN, "mlp": PINK}
TYPE_LETTERS = {"decoder": "", **PATTERN_LETTER}
TYPE_NAMES = {"decoder": "decoder layer", "mamba": "Mamba2 (M)", "moe": "MoE (E)", "attention": "attention (*)",
              "mlp": "MLP (-)"}
REMOVED = VERMILLION

#: Which stage writes each input table (for the errors a missing column raises).
SOURCES = {
    "state_energies": "state_energies.csv is written by the correlate stage of the comparison harness "
                      "(make compare / python -m cbo_utils.experiments.compare)",
    "correlations": "correlations.csv is written by the correlate stage of the comparison harness (make compare)",
    "states": "states_M<M>.csv is written by the states stage of make reproduce (cbo_utils.experiments.pipeline); "
              "compare/states_<variant>_M<M>.csv by the select stage of make compare",
    "evaluations": "evaluations.csv is written by the evaluate stage of make compare (and by make retrain)",
    "hybrid_evaluations": "hybrid/hybrid_evaluations.csv is written by make hybrid "
                          "(python -m cbo_utils.experiments.hybrid)",
    "hybrid_states": "hybrid/hybrid_states.csv is written by make hybrid (python -m cbo_utils.experiments.hybrid)",
}

ENERGY_DEFAULT = r"energy $E(x)$"


def energy_axis_label(variant: str) -> str:
    """The x-axis label of a CBO variant's energy: its registered energy's formula (:data:`ENERGIES` labels), or a
    generic label for a name that is not a registered variant."""
    try:
        return "energy " + get_energy(get_variant(variant).energy).label
    except ValueError:
        return ENERGY_DEFAULT

_RC = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "figure.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False,
    "savefig.dpi": DPI, "figure.dpi": DPI, "path.simplify": False, "svg.hashsalt": "cbo",
}


@dataclass
class Drawn:
    """One figure: where it was written (None: nothing to draw, see ``notes``) and what it shows."""

    path: Path | None
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ================================================================================================== helpers
def slug(text: str) -> str:
    """A file-name part: ``nvidia/X`` → ``nvidia__X`` (as the pipeline names model folders), ``moe:3`` → ``moe3``,
    ``mamba:1+moe:1`` → ``mamba1_moe1``."""
    return str(text).replace("/", "__").replace(":", "").replace("+", "_").replace(" ", "-")


def _canon(blocks: Any) -> str:
    """Canonical block string ('' for none) so tables from different writers match."""
    if blocks is None or (isinstance(blocks, float) and math.isnan(blocks)):
        return ""
    return format_blocks(parse_blocks(str(blocks)))


def _table(obj: Any, kind: str, required: Sequence[str], purpose: str) -> tuple[pd.DataFrame, str]:
    """``obj`` (path or DataFrame) as a DataFrame with ``required`` columns; ValueError naming the missing ones, the
    figure that needs them and the stage that writes them."""
    if isinstance(obj, pd.DataFrame):
        df, name = obj.copy(), f"the {kind} table"
    else:
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; {SOURCES[kind]}")
        df = pd.read_csv(path, dtype={"removed_blocks": str, "budget": str, "method": str, "variant": str,
                                      "model": str, "kind": str, "removed_types": str})
        name = str(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {missing} needed for {purpose}; {SOURCES[kind]} — rerun that "
                         "stage with the current code")
    if "removed_blocks" in df.columns:
        df["removed_blocks"] = df["removed_blocks"].map(_canon)
    return df, name


def _one_model(df: pd.DataFrame, model: str | None, name: str) -> str:
    if model is not None:
        return str(model)
    models = list(dict.fromkeys(df["model"].astype(str)))
    if len(models) != 1:
        raise ValueError(f"{name} holds {len(models)} models {models}: pass model=")
    return models[0]


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in ("true", "1", "1.0")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """PNG bytes without the ``Software`` chunk (and no time chunk: Agg writes none), written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


@contextlib.contextmanager
def _style():
    """matplotlib's default style plus ours, whatever the user's matplotlibrc says (same bytes everywhere)."""
    with matplotlib.style.context("default", after_reset=True), matplotlib.rc_context(_RC):
        yield


def _fmt_e(x: float) -> str:
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.3e}"


def _n_blocks_from_sidecars(path: Path) -> int | None:
    """N of a states file from its sidecar (``solver_info.N``) or the gradients sidecar beside it."""
    cands = [path.with_name(path.name + ".json"), path.parent / "gradients.safetensors.json",
             path.parent.parent / "gradients.safetensors.json"]
    cands += sorted(path.parent.glob("gradients*.safetensors.json"))
    for c in cands:
        if not c.is_file():
            continue
        meta = read_json(c)
        n = (meta.get("solver_info") or {}).get("N") or meta.get("blocks")
        if n is None and isinstance(meta.get("block_types"), list):
            n = len(meta["block_types"])
        if n:
            return int(n)
    return None


def block_types_from_sidecar(path: Path) -> list[str] | None:
    """The block types a gradients sidecar (``gradients.safetensors.json``) records, if any."""
    path = Path(path)
    if not path.is_file():
        return None
    types = read_json(path).get("block_types")
    return [str(t) for t in types] if isinstance(types, list) else None


def _resolve_types(block_types: Sequence[str] | str | None, N: int) -> list[str]:
    if block_types is None:
        return ["decoder"] * N
    if isinstance(block_types, str):

        block_types = pattern_types(block_types)
    types = [str(t) for t in block_types]
    if len(types) != N:
        raise ValueError(f"block_types has {len(types)} entries for N = {N} blocks")
    return types


def _nano_id() -> str:

    return NANO_MODEL_ID


# ================================================================================================== Fig. 1
def draw_method(states: Any, out_dir: Any, *, model: str, rank: int = 0, n_blocks: int | None = None,
                block_types: Sequence[str] | str | None = None, label: str | None = None,
                energy_label: str = r"$E(x) = x^\top H x$", constraint: str | None = None,
                note: str | None = None) -> Drawn:
    """Fig. 1, the method drawn from a real result: the N blocks of ``model`` on the residual stream, each with its
    gate α_i (h ← h + α_i·f_i(norm h)), and the spins of one state (default: the ground state, ``rank`` 0) of a
    states table (rank, energy, removed_blocks): kept = ↑ (x_i = 0, α_i = 1), removed = ↓ (x_i = 1, α_i = 0).

    ``block_types``: one type name per block or a NemotronH pattern string (``"MEMEM*E…"``) to colour hybrid blocks
    by type. ``label`` replaces ``M<M>`` in the file name (hybrid budgets: ``moe:3`` → ``moe3``).
    Returns data ``{"N", "M", "rank", "energy", "removed", "kept", "block_types"}``."""
    df, name = _table(states, "states", ["rank", "energy", "removed_blocks"], "the method figure (Fig. 1)")
    row = df[df["rank"].astype(int) == int(rank)]
    if not len(row):
        raise ValueError(f"{name} has no state of rank {rank}")
    row = row.iloc[0]
    removed = parse_blocks(row["removed_blocks"])
    N = n_blocks or (_n_blocks_from_sidecars(Path(states)) if not isinstance(states, pd.DataFrame) else None)
    if N is None:
        if block_types is None:
            raise ValueError("pass n_blocks (the states table does not say how many blocks the model has)")
        N = len(block_types) if not isinstance(block_types, str) else len(block_types)
    if removed and max(removed) >= N:
        raise ValueError(f"state {rank} removes block {max(removed)} but the model has N = {N} blocks")
    types = _resolve_types(block_types, N)
    M, energy = len(removed), float(row["energy"])
    rem = set(removed)
    with _style():
        fig = _new_figure(max(7.5, 0.26 * N + 2.6), 3.7)
        ax = fig.add_subplot()
        ax.set_xlim(-3.2, N + 0.2)
        ax.set_ylim(-2.35, 2.35)
        ax.set_axis_off()
        ax.annotate("", xy=(N - 0.1, 0), xytext=(-0.9, 0), arrowprops={"arrowstyle": "-|>", "lw": 1.4, "color": BLACK})
        small = 7 if N <= 40 else 6
        for i in range(N):
            off = i in rem
            col = TYPE_COLOURS.get(types[i], GREY)
            ax.add_patch(Rectangle((i - 0.38, 1.05), 0.76, 0.75, facecolor="white" if off else col,
                                   edgecolor=col if off else BLACK, lw=1.0 if off else 0.8, ls="--" if off else "-",
                                   hatch="////" if off else None))  # removed: hollow, hatched in its type colour
            if TYPE_LETTERS.get(types[i]):
                ax.text(i, 1.42, TYPE_LETTERS[types[i]], ha="center", va="center", fontsize=small,
                        color=GREY if off else ("white" if types[i] in ("mamba", "attention") else BLACK))
            ax.plot([i, i], [1.05, 0.08], color=GREY if off else BLACK, lw=0.8, ls=":" if off else "-")
            ax.plot(i, 0.55, marker="o", ms=11 if N <= 40 else 9, mfc=REMOVED if off else "white", mec=BLACK,
                    mew=0.7, zorder=3)  # a marker stays round whatever the axes' aspect
            ax.text(i, 0.55, "0" if off else "1", ha="center", va="center", fontsize=small - 1, zorder=4,
                    color="white" if off else BLACK)
            ax.plot(i, 0, marker="o", ms=4, mfc="white", mec=BLACK, mew=0.7, zorder=3)
            if off:
                ax.annotate("", xy=(i, -1.3), xytext=(i, -0.35),
                            arrowprops={"arrowstyle": "-|>", "lw": 1.6, "color": REMOVED})
            else:
                ax.annotate("", xy=(i, -0.35), xytext=(i, -1.3),
                            arrowprops={"arrowstyle": "-|>", "lw": 1.6, "color": BLUE})
            ax.text(i, -1.6, str(i), ha="center", va="top", fontsize=small - 1, rotation=90 if N > 40 else 0)
        for y, txt in ((1.42, "blocks $f_i$"), (0.55, r"gates $\alpha_i$"), (0.0, "residual $h$"),
                       (-0.82, "spins"), (-1.75, "block index")):
            ax.text(-1.1, y, txt, ha="right", va="center", fontsize=8)
        ax.text(-0.9, 2.05, r"$h \leftarrow h + \alpha_i\, f_i(\mathrm{norm}(h))$;  removing block $i$: "
                r"$\alpha_i: 1 \to 0$", fontsize=8, va="center")
        handles = [Line2D([], [], color=BLUE, marker=r"$\uparrow$", ls="", ms=9,
                          label=r"kept: $x_i = 0$, $\alpha_i = 1$"),
                   Line2D([], [], color=REMOVED, marker=r"$\downarrow$", ls="", ms=9,
                          label=r"removed: $x_i = 1$, $\alpha_i = 0$")]
        handles += [Patch(facecolor=TYPE_COLOURS.get(t, GREY), edgecolor=BLACK, label=TYPE_NAMES.get(t, t))
                    for t in dict.fromkeys(types) if t != "decoder"]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        state = "ground state CBO:0" if int(rank) == 0 else f"excited state CBO:{int(rank)}"
        cons = constraint or r"$\sum_i x_i = M$"
        title = (f"{model}: the {state} removes M = {M} of N = {N} blocks" + (f" ({note})" if note else "")
                 + f"\nminimise {energy_label} subject to {cons}, " + r"$x \in \{0,1\}^N$"
                 + f";  this state: E = {_fmt_e(energy)}")
        fig.suptitle(title)
        path = _save(fig, Path(out_dir) / f"method__{slug(model)}__{slug(label or f'M{M}')}.png")
    return Drawn(path, {"N": N, "M": M, "rank": int(rank), "energy": energy, "removed": removed,
                        "kept": [i for i in range(N) if i not in rem], "block_types": types,
                        "title": title})


# ================================================================================================== Figs. 2-3
def _panel_rho(sub: pd.DataFrame, y: str) -> tuple[float, float]:

    rho = spearman(sub["energy"].to_numpy(float), sub[y].to_numpy(float)) if len(sub) >= 2 else float("nan")
    low = sub[sub["kind"] == "lowest"]
    rho_low = spearman(low["energy"].to_numpy(float), low[y].to_numpy(float)) if len(low) > 2 else float("nan")
    return rho, rho_low


def draw_energy_vs_score(state_energies: Any, out_dir: Any, score: str = "perplexity", *, model: str | None = None,
                         correlations: Any = None) -> Drawn:
    """Figs. 2 (``score="zero_shot_mean"``) and 3 (``score="perplexity"``, log y): energy against the score of
    every low-energy (``kind == "lowest"``) and random feasible state of ``state_energies.csv``, one panel per
    (variant, M) — rows variants, columns M — with Spearman ρ(energy, score) in each title (all states, and the
    lowest only), computed here with :func:`cbo_utils.select.cbo.spearman`. ρ is rank-based, so ρ(energy, ppl) =
    ρ(energy, log ppl), the ``spearman_all`` of ``correlations.csv``; when that table is given, its value is
    returned next to ours (``data["rho"]["rho_file"]``) and a mismatch is noted.

    Panels without scores are left empty with a note; without any, nothing is written (``path`` None).
    Returns data ``{"points": DataFrame (variant, M, kind, rank, removed_blocks, energy, score), "rho": DataFrame
    (variant, M, n, rho, rho_lowest, rho_file)}``."""
    if score not in ("perplexity", "zero_shot_mean"):
        raise ValueError(f"score must be 'perplexity' or 'zero_shot_mean', not {score!r}")
    fig_no = "Fig. 3" if score == "perplexity" else "Fig. 2"
    df, name = _table(state_energies, "state_energies", ["model", "variant", "M", "kind", "rank", "energy", score],
                      f"energy vs {score} ({fig_no})")
    model = _one_model(df, model, name)
    df = df[df["model"].astype(str) == model].copy()
    df[score] = pd.to_numeric(df[score], errors="coerce")
    df["M"] = df["M"].astype(int)
    variants = list(dict.fromkeys(df["variant"].astype(str)))
    Ms = sorted(df["M"].unique().tolist())
    file_rho: dict[tuple[str, int], float] = {}
    if correlations is not None:
        col = "spearman_all" if score == "perplexity" else "spearman_zero_shot"
        corr, _ = _table(correlations, "correlations", ["model", "variant", "M"], f"the ρ check of {fig_no}")
        if col in corr.columns:
            for r in corr[corr["model"].astype(str) == model].itertuples(index=False):
                file_rho[(str(r.variant), int(r.M))] = float(getattr(r, col))
    notes, points, rhos, empty = [], [], [], []
    why = " (the correlate stage measures them only when compare.spearman.zero_shot is set)" \
        if score == "zero_shot_mean" else ""
    what = "held-out perplexity" if score == "perplexity" else "zero-shot mean accuracy"
    with _style():
        fig = _new_figure(max(6.5, 3.7 * len(Ms)), 2.9 * len(variants) + 1.1)
        axes = fig.subplots(len(variants), len(Ms), squeeze=False)
        for a, v in enumerate(variants):
            for b, M in enumerate(Ms):
                ax = axes[a][b]
                sub = df[(df["variant"] == v) & (df["M"] == M)]
                sub = sub[np.isfinite(sub[score].to_numpy(float))]
                if len(sub) < 2:
                    empty.append(f"{v} M={M}")
                    ax.set_axis_off()
                    ax.text(0.5, 0.5, f"{v}, M = {M}\nno {what}", ha="center", va="center",
                            transform=ax.transAxes, color=GREY)
                    continue
                rho, rho_low = _panel_rho(sub, score)
                rf = file_rho.get((v, M), float("nan"))
                if np.isfinite(rf) and not math.isclose(rf, rho, rel_tol=1e-9, abs_tol=1e-9):
                    notes.append(f"{v}, M = {M}: ρ = {rho:.6f} from state_energies differs from the correlations "
                                 f"table's {rf:.6f} (the two files come from different runs?)")
                rhos.append({"variant": v, "M": M, "n": len(sub), "rho": rho, "rho_lowest": rho_low,
                             "rho_file": rf})
                points.append(sub.assign(score=sub[score])[["variant", "M", "kind", "rank", "removed_blocks",
                                                             "energy", "score"]])
                for kind, mk, col, kw in (("random", "^", ORANGE, {"mfc": "none"}),
                                          ("lowest", "o", BLUE, {"alpha": 0.85})):
                    s = sub[sub["kind"] == kind]
                    ax.plot(s["energy"], s[score], ls="", marker=mk, color=col, ms=4.5, **kw)
                g = sub[(sub["kind"] == "lowest") & (sub["rank"].astype(int) == 0)]
                if len(g):
                    ax.plot(g["energy"], g[score], ls="", marker="*", ms=11, mfc=YELLOW, mec=BLACK, mew=0.8)
                if score == "perplexity":
                    ax.set_yscale("log")
                n_low = int((sub["kind"] == "lowest").sum())
                ax.set_title(f"{v}, M = {M}\nSpearman ρ = {rho:+.2f} (all {len(sub)} states)"
                             + (f"\nρ = {rho_low:+.2f} over the {n_low} lowest" if np.isfinite(rho_low) else ""))
                e = sub["energy"].to_numpy(float)  # Fisher energies: the k lowest often sit decades below random
                log_x = bool((e > 0).all() and e.max() >= 100 * e.min())
                if log_x:
                    ax.set_xscale("log")
                ax.set_xlabel(energy_axis_label(v) + (", log scale" if log_x else ""))
                ax.set_ylabel("held-out perplexity (log scale)" if score == "perplexity"
                              else "zero-shot mean accuracy (fraction)")
                ax.grid(alpha=0.3, lw=0.5)
        if not rhos:
            return Drawn(None, {"points": pd.DataFrame(), "rho": pd.DataFrame()},
                         notes + [f"{model}: no (variant, M) has two or more {score} values{why}: {fig_no} not drawn"])
        if empty:
            notes.append(f"{model}: panels left empty for lack of {score} values: {', '.join(empty)}{why}")
        handles = [Line2D([], [], ls="", marker="o", color=BLUE, label="low-energy states (k lowest)"),
                   Line2D([], [], ls="", marker="^", color=ORANGE, mfc="none", label="random feasible states"),
                   Line2D([], [], ls="", marker="*", ms=11, mfc=YELLOW, mec=BLACK, label="ground state CBO:0")]
        fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
        good = "higher accuracy (ρ < 0)" if score == "zero_shot_mean" else "lower perplexity (ρ > 0)"
        title = (f"{model}: energy vs {what} of the states removing M blocks (no retraining)\n"
                 f"if low energy means a good model, lower energy goes with {good}")
        fig.suptitle(title)
        stem = "energy_vs_perplexity" if score == "perplexity" else "energy_vs_zero_shot"
        path = _save(fig, Path(out_dir) / f"{stem}__{slug(model)}.png")
    return Drawn(path, {"points": pd.concat(points, ignore_index=True), "rho": pd.DataFrame(rhos),
                        "title": title}, notes)


def draw_energy_vs_perplexity(state_energies: Any, out_dir: Any, **kw) -> Drawn:
    """Fig. 3: :func:`draw_energy_vs_score` with held-out perplexity (log y)."""
    return draw_energy_vs_score(state_energies, out_dir, "perplexity", **kw)


def draw_energy_vs_zero_shot(state_energies: Any, out_dir: Any, **kw) -> Drawn:
    """Fig. 2: :func:`draw_energy_vs_score` with the zero-shot mean accuracy."""
    return draw_energy_vs_score(state_energies, out_dir, "zero_shot_mean", **kw)


# ================================================================================================== Fig. 4
def _measurements(evaluations: pd.DataFrame, model: str, M: int, retrained: bool) -> dict[str, dict[str, float]]:
    """removed_blocks → {task: value}, zero-shot tasks with the literature's metric (acc_norm for hellaswag and
    arc_challenge, acc otherwise), ``heldout_ppl`` as perplexity. Several methods that picked the same blocks give
    the same numbers; the first method (alphabetically) wins."""

    ev = evaluations[(evaluations["model"].astype(str) == model) & (pd.to_numeric(evaluations["M"]) == M)]
    ev = ev[ev["retrained"].map(_truthy) == retrained].sort_values(["method", "task", "metric"], kind="mergesort")
    out: dict[str, dict[str, float]] = {}
    for r in ev.itertuples(index=False):
        want = "perplexity" if r.task == "heldout_ppl" else ZERO_SHOT_METRIC.get(r.task, "acc")
        if r.metric != want or not np.isfinite(float(r.value)):
            continue
        out.setdefault(r.removed_blocks, {}).setdefault(str(r.task), float(r.value))
    return out


def draw_states_map(states: Any, out_dir: Any, *, model: str, variant: str | None = None, M: int | None = None,
                    n_blocks: int | None = None, top: int = 20, evaluations: Any = None, state_energies: Any = None,
                    retrained: bool = False, tasks: Sequence[str] | None = None) -> Drawn:
    """Fig. 4: the removed blocks of the ``top`` lowest-energy states of a states table as a states × blocks map
    (row r = CBO:r, column = block, filled = removed); beside it, when ``state_energies`` has them, each state's
    held-out perplexity; and the benchmarks of the ground state CBO:0 against the best excited state, when
    ``evaluations`` (matched by model, M and removed blocks; ``retrained`` selects before/after KD) has both.
    "Best excited state" (rule fixed here): among the excited states of the map measured on the same benchmarks as
    CBO:0, the highest mean accuracy over those zero-shot tasks (ties → lower rank); without zero-shot tasks, the
    lowest held-out perplexity.

    Returns data ``{"matrix": (rows × N) 0/1 array, "ranks", "removed", "N", "M", "perplexity": {rank: ppl},
    "comparison": DataFrame (task, CBO:0, CBO:k) or None, "excited_rank"}``."""
    df, name = _table(states, "states", ["rank", "energy", "removed_blocks"], "the states map (Fig. 4)")
    df = df.sort_values("rank", kind="mergesort").head(top).reset_index(drop=True)
    if not len(df):
        raise ValueError(f"{name} has no states")
    sets = [parse_blocks(b) for b in df["removed_blocks"]]
    sizes = sorted({len(s) for s in sets})
    if len(sizes) != 1 or (M is not None and sizes[0] != M):
        raise ValueError(f"{name}: states remove {sizes} blocks" + (f", expected M = {M}" if M is not None else ""))
    M = sizes[0]
    notes: list[str] = []
    N = n_blocks or (_n_blocks_from_sidecars(Path(states)) if not isinstance(states, pd.DataFrame) else None)
    if N is None:
        N = max(max(s) for s in sets if s) + 1
        notes.append(f"N not recorded beside {name}: assumed N = {N} (the highest removed block + 1)")
    ranks = df["rank"].astype(int).tolist()
    mat = np.zeros((len(df), N), dtype=np.int8)
    for r, s in enumerate(sets):
        mat[r, s] = 1
    # per-state held-out perplexity (state_energies.csv; the same blocks have the same perplexity in any variant)
    ppl: dict[int, float] = {}
    if state_energies is not None:
        se, _ = _table(state_energies, "state_energies", ["model", "M", "removed_blocks", "perplexity"],
                       "the per-state perplexity of Fig. 4")
        se = se[(se["model"].astype(str) == model) & (se["M"].astype(int) == M)]
        by_blocks = {}
        for b, p in zip(se["removed_blocks"], pd.to_numeric(se["perplexity"], errors="coerce")):
            if np.isfinite(p):
                by_blocks.setdefault(b, float(p))
        ppl = {rk: by_blocks[b] for rk, b in zip(ranks, df["removed_blocks"]) if b in by_blocks}
    # the CBO:0 vs best excited state comparison (evaluations.csv)
    comparison, excited, cmp_note, cmp_missing = None, None, None, ""
    if evaluations is not None:
        ev, _ = _table(evaluations, "evaluations", ["model", "method", "M", "task", "metric", "value", "retrained",
                                                    "removed_blocks"], "the benchmark bars of Fig. 4")
        meas = _measurements(ev, model, M, retrained)
        ground = meas.get(df["removed_blocks"].iloc[0], {})
        order = [t for t in (tasks or ()) if t in ground] + sorted(t for t in ground if t not in (tasks or ()))
        zs = [t for t in order if t != "heldout_ppl"]
        excited_meas = [(rk, meas.get(b, {})) for rk, b in zip(ranks[1:], df["removed_blocks"].iloc[1:])]
        if zs and not any(all(t in m for t in zs) for _, m in excited_meas):
            zs = []  # no excited state has CBO:0's zero-shot tasks: compare held-out perplexity alone
        best = None
        for rk, m in excited_meas:
            if zs and all(t in m for t in zs):
                key = (-float(np.mean([m[t] for t in zs])), rk)
            elif not zs and "heldout_ppl" in ground and "heldout_ppl" in m:
                key = (m["heldout_ppl"], rk)
            else:
                continue
            if best is None or key < best[0]:
                best = (key, rk, m)
        if ground and best is not None:
            excited = best[1]
            shown = zs + (["mean"] if len(zs) > 1 else []) if zs else ["heldout_ppl"]
            g = dict(ground, mean=float(np.mean([ground[t] for t in zs])) if zs else np.nan)
            e = dict(best[2], mean=float(np.mean([best[2][t] for t in zs])) if zs else np.nan)
            comparison = pd.DataFrame({"task": shown, "CBO:0": [g[t] for t in shown],
                                       f"CBO:{excited}": [e[t] for t in shown]})
            if "heldout_ppl" in ground and "heldout_ppl" in best[2] and zs:
                cmp_note = (ground["heldout_ppl"], best[2]["heldout_ppl"])
        else:
            cmp_missing = "CBO:0" if not ground else "an excited state measured like CBO:0"
            notes.append(f"{model} M = {M}{' ' + variant if variant else ''}: evaluations lack {cmp_missing}"
                         " — map only")
    with _style():
        show_ppl, show_cmp = bool(ppl), comparison is not None
        widths = [max(4.0, 0.2 * N + 1.2)] + ([1.7] if show_ppl else []) + ([3.8] if show_cmp else [])
        fig = _new_figure(sum(widths) + 0.6, 0.24 * len(df) + 2.3)
        axs = fig.subplots(1, len(widths), width_ratios=widths, squeeze=False)[0]
        ax = axs[0]
        ax.imshow(mat, cmap=ListedColormap(["white", REMOVED]), vmin=0, vmax=1, aspect="auto",
                  interpolation="nearest")
        ax.set_xticks(np.arange(-0.5, N, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, len(df), 1), minor=True)
        ax.grid(which="minor", color=GREY, lw=0.4)
        ax.tick_params(which="minor", length=0)
        step = 1 if N <= 32 else (2 if N <= 64 else 4)
        ax.set_xticks(range(0, N, step))
        ax.set_yticks(range(len(df)), [f"CBO:{r}" for r in ranks])
        ax.set_xlabel("block index (0-based)")
        ax.set_ylabel("state (energy rank; CBO:0 = ground state)")
        ax.set_title(f"removed blocks (filled) of the {len(df)} lowest-energy states")
        if excited is not None:
            ax.get_yticklabels()[ranks.index(excited)].set_fontweight("bold")
            ax.get_yticklabels()[0].set_fontweight("bold")
        k = 1
        if show_ppl:
            pa = axs[k]
            k += 1
            ys = [ranks.index(r) for r in ppl]
            pa.set_ylim(len(df) - 0.5, -0.5)
            pa.set_yticks(range(len(df)), [])
            lo, hi = min(ppl.values()), max(ppl.values())
            log_ppl = hi >= 10 * lo or len(ppl) == 1
            if log_ppl:  # removing blocks can cost decades of perplexity
                pa.set_xscale("log")
                pa.set_xlim(lo / 3, hi * 3)
                pa.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short log axis
            else:
                pa.set_xlim(0, hi * 1.15)
            pa.hlines(ys, pa.get_xlim()[0], list(ppl.values()), color=GREY, lw=0.6)
            pa.plot(list(ppl.values()), ys, ls="", marker="o", ms=4.5, color=BLUE)
            pa.set_xlabel("held-out perplexity" + ("\n(log scale)" if log_ppl else ""))
            pa.set_title("per state\n" + (f"({len(ppl)} of {len(df)} measured)" if len(ppl) < len(df) else
                                          "(correlate stage)"))
            pa.grid(axis="x", alpha=0.3, lw=0.5)
        if show_cmp:
            ba = axs[k]
            cols = list(comparison.columns[1:])
            when = "after KD" if retrained else "no retraining"
            if comparison["task"].iloc[0] == "heldout_ppl":  # perplexity only: dots on a log axis (bars need a 0)
                vals = comparison.iloc[0][cols].to_numpy(float)
                for j, colour in enumerate((BLUE, ORANGE)):
                    ba.plot([j], [vals[j]], ls="", marker="o", ms=9, color=colour)
                    ba.annotate(_fmt_e(vals[j]), (j, vals[j]), textcoords="offset points", xytext=(0, 8),
                                ha="center", fontsize=8)
                ba.set_xticks(range(len(cols)), cols)
                ba.set_xlim(-0.6, len(cols) - 0.4)
                ba.set_yscale("log")
                lo, hi = float(vals.min()), float(vals.max())
                ba.set_ylim(lo / 3, hi * 3)
                ba.set_ylabel("held-out perplexity (evaluate stage, log scale)")
                ba.grid(axis="y", alpha=0.3, lw=0.5)
                ba.set_title(f"CBO:0 vs CBO:{excited}, the best evaluated\nexcited state by held-out perplexity "
                             f"({when})")
            else:
                x = np.arange(len(comparison))
                labels = list(cols)
                if cmp_note:
                    labels = [f"{c} (held-out ppl {_fmt_e(p)})" for c, p in zip(cols, cmp_note)]
                for j, (c, colour) in enumerate(zip(cols, (BLUE, ORANGE))):
                    bars = ba.bar(x + (j - 0.5) * 0.38, comparison[c], width=0.38, color=colour, label=labels[j])
                    ba.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
                ba.set_xticks(x, [t.replace("_", " ") for t in comparison["task"]], rotation=30, ha="right")
                ba.set_ylabel("accuracy (fraction; acc_norm for\nhellaswag, arc_challenge)")
                ba.set_ylim(0, min(1.05, float(comparison[cols].to_numpy().max()) * 1.35 + 0.02))
                ba.legend(loc="upper right", frameon=False, fontsize=7)
                ba.set_title(f"CBO:0 vs CBO:{excited}, the best evaluated\nexcited state by zero-shot mean ({when})")
        elif evaluations is not None:
            ax.text(1.0, -0.14, f"no benchmark comparison: evaluations.csv lacks {cmp_missing}",
                    transform=ax.transAxes, ha="right", va="top", fontsize=7, color=GREY)
        vname = f" ({variant})" if variant else ""
        title = f"{model}{vname}: M = {M} of N = {N} blocks removed"
        fig.suptitle(title)
        parts = [model] + ([variant] if variant else []) + [f"M{M}"]
        path = _save(fig, Path(out_dir) / ("states_map__" + "__".join(slug(p) for p in parts) + ".png"))
    return Drawn(path, {"matrix": mat, "ranks": ranks, "removed": sets, "N": N, "M": M, "perplexity": ppl,
                        "comparison": comparison, "excited_rank": excited, "title": title}, notes)


# ================================================================================================== Fig. 5
def draw_hybrid_retention(evaluations: Any, out_dir: Any, *, model: str | None = None) -> Drawn:
    """Fig. 5: per budget of the hybrid experiment (``hybrid_evaluations.csv``), the perplexity retention (dense
    ppl / pruned ppl) and accuracy retention (pruned / dense next-token accuracy) of the k CBO states (points by
    rank, colour = rank; the re-ranked pick ringed when the table marks it) against block influence, one-shot and
    iterative. No retraining. A stand-in model says so in the title.

    Returns data ``{"points": DataFrame (budget, method, rank, x, ppl_retention, accuracy_retention),
    "budgets", "stand_in"}``."""
    df, name = _table(evaluations, "hybrid_evaluations", ["model", "stand_in", "budget", "method", "rank",
                                                          "ppl_retention", "accuracy_retention"],
                      "the hybrid retention figure (Fig. 5)")
    model = _one_model(df, model, name)
    df = df[df["model"].astype(str) == model].copy()
    df["budget"] = df["budget"].fillna("").astype(str)
    stand_in = bool(df["stand_in"].map(_truthy).any())
    df = df[df["budget"] != ""]
    budgets = list(dict.fromkeys(df["budget"]))
    if not budgets:
        raise ValueError(f"{name} has no pruned rows for {model} (only the dense model?)")
    is_cbo = df["method"].astype(str).str.startswith("cbo:")
    cbo = df[is_cbo].copy()
    cbo["rank"] = pd.to_numeric(cbo["rank"], errors="coerce")
    cbo["rank"] = cbo["rank"].fillna(cbo["method"].str.slice(4).map(lambda s: float(s) if s.isdigit() else np.nan))
    kmax = max(int(cbo["rank"].max()) if len(cbo) else 0, 1)
    pts = []
    for b, budget in enumerate(budgets):
        s = cbo[cbo["budget"] == budget].sort_values("rank", kind="mergesort")
        for r in s.itertuples(index=False):
            pts.append({"budget": budget, "method": r.method, "rank": int(r.rank), "x": b - 0.38 + 0.5 * r.rank / kmax,
                        "ppl_retention": float(r.ppl_retention), "accuracy_retention": float(r.accuracy_retention),
                        "rerank_pick": _truthy(getattr(r, "rerank_pick", False))})
        for method, dx in (("block_influence", 0.24), ("block_influence_iterative", 0.36)):
            s = df[(df["budget"] == budget) & (df["method"] == method)]
            for r in s.itertuples(index=False):
                pts.append({"budget": budget, "method": method, "rank": None, "x": b + dx,
                            "ppl_retention": float(r.ppl_retention),
                            "accuracy_retention": float(r.accuracy_retention), "rerank_pick": False})
    points = pd.DataFrame(pts)
    with _style():
        import matplotlib.cm as cm
        from matplotlib.colors import Normalize

        fig = _new_figure(max(7.5, 1.25 * len(budgets) + 3.0), 6.4)
        axs = fig.subplots(2, 1, sharex=True)
        norm = Normalize(0, kmax)
        cmap = matplotlib.colormaps["viridis"]
        for ax, col, lab in ((axs[0], "ppl_retention", "perplexity retention\n(dense ppl / pruned ppl)"),
                             (axs[1], "accuracy_retention", "next-token accuracy retention\n(pruned / dense)")):
            ax.axhline(1.0, color=GREY, lw=0.8, ls="--")
            c = points[points["method"].str.startswith("cbo:")]
            ax.scatter(c["x"], c[col], c=[cmap(norm(r)) for r in c["rank"]], s=22, edgecolors=BLACK,
                       linewidths=0.3, zorder=3)
            pick = c[c["rerank_pick"]]
            ax.scatter(pick["x"], pick[col], s=90, facecolors="none", edgecolors=BLACK, linewidths=1.0, zorder=4)
            for method, mk, colour in (("block_influence", "D", VERMILLION),
                                       ("block_influence_iterative", "s", BLACK)):
                s = points[points["method"] == method]
                ax.scatter(s["x"], s[col], marker=mk, s=34, facecolors="none" if mk == "s" else colour,
                           edgecolors=colour, linewidths=1.1, zorder=4)
            ax.set_ylabel(lab)
            ax.grid(axis="y", alpha=0.3, lw=0.5)
            for b in range(1, len(budgets)):
                ax.axvline(b - 0.5, color=GREY, lw=0.4, alpha=0.5)
        axs[1].set_xticks(range(len(budgets)), budgets)
        axs[1].set_xlabel("removal budget (type:number of blocks removed; removal restricted to those types)")
        axs[1].set_xlim(-0.6, len(budgets) - 0.4)
        sm = cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=list(axs), label="CBO state (energy rank; 0 = ground state)", shrink=0.8)
        handles = [Line2D([], [], ls="", marker="o", color=cmap(0.0), mec=BLACK, label="CBO:k (colour = k)"),
                   Line2D([], [], ls="", marker="D", color=VERMILLION, label="block influence, one-shot"),
                   Line2D([], [], ls="", marker="s", mfc="none", color=BLACK, label="block influence, iterative"),
                   Line2D([], [], ls="--", color=GREY, label="dense model (= 1)")]
        if len(points) and points["rerank_pick"].any():
            handles.insert(1, Line2D([], [], ls="", marker="o", ms=9, mfc="none", mec=BLACK,
                                     label="re-ranked pick (calibration CE)"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        title = f"{model}: retention without retraining, per type-restricted budget"
        if stand_in:
            title += f"\nstand-in for {_nano_id()} (a small model with its layer pattern, not the real model)"
        fig.suptitle(title)
        path = _save(fig, Path(out_dir) / f"hybrid_retention__{slug(model)}.png")
    return Drawn(path, {"points": points, "budgets": budgets, "stand_in": stand_in, "title": title})


# ================================================================================================== all
def _profile_settings(profile: str | None) -> dict:
    return load_profile(profile) if profile else {}


@dataclass
class Job:
    """One figure to draw: ``draw()`` returns the :class:`Drawn`; ``inputs`` are recorded with their SHA-256."""

    draw: Callable[[], Drawn]
    inputs: list[Path]


@dataclass
class Skip:
    """A figure that cannot be drawn from this results folder, and why."""

    figure: str
    reason: str


@dataclass
class FigureInputs:
    """What a figure's planner may read: the results folder, the figures folder and the profile's settings."""

    results: Path
    out: Path
    cfg: dict

    @property
    def tasks(self):
        return (self.cfg.get("compare") or {}).get("tasks")

    def file(self, name: str) -> Path | None:
        """``results/<name>`` when it exists, else None."""
        p = self.results / name
        return p if p.is_file() else None

    def model_dirs(self) -> list[Path]:
        """The per-model folders holding ``states_M<M>.csv``."""
        return list(dict.fromkeys(sorted(p.parent for p in self.results.glob("*/states_M*.csv"))))


@dataclass(frozen=True)
class FigureSpec:
    """A registered figure: its file prefix, the paper item it reproduces, and its planner — a function of
    :class:`FigureInputs` that yields a :class:`Job` per file to draw and a :class:`Skip` per file it cannot."""

    name: str
    paper_item: str
    plan: Callable[[FigureInputs], Iterable[Job | Skip]]


#: The figure registry (file prefix → :class:`FigureSpec`), in drawing order; :func:`register_figure` adds one.
FIGURES: dict[str, FigureSpec] = {}


def register_figure(name: str, paper_item: str):
    """Decorator: register a planner as the figure ``name`` (the file prefix) reproducing ``paper_item``."""
    def deco(plan):
        if name in FIGURES:
            raise ValueError(f"a figure named {name!r} is already registered")
        FIGURES[name] = FigureSpec(name, paper_item, plan)
        return plan
    return deco


def _states_files(mdir: Path) -> list[tuple[Path, int]]:
    return [(f, int(f.stem.split("_M")[-1])) for f in
            sorted(mdir.glob("states_M*.csv"), key=lambda p: int(p.stem.split("_M")[-1]))]


@register_figure("method", "Fig. 1")
def _plan_method(ctx: FigureInputs):
    """One method sketch per states table of the core stages, and one per budget of the hybrid experiment."""
    if not ctx.model_dirs():
        yield Skip("Fig. 1 method", f"no <model>/states_M<M>.csv under {ctx.results} (make reproduce)")
    for mdir in ctx.model_dirs():
        model = mdir.name
        grads = mdir / "gradients.safetensors.json"
        for f, M in _states_files(mdir):
            side = read_json(f.with_name(f.name + ".json")) if f.with_name(f.name + ".json").is_file() else {}
            elabel = get_energy((side.get("parameters") or {}).get("energy", "fisher")).label
            types = block_types_from_sidecar(grads)
            if _n_blocks_from_sidecars(f) is None and types is None:
                yield Skip(f"Fig. 1 method {model} M{M}", f"the number of blocks is not recorded beside {f.name} "
                           "(no sidecar, no gradients.safetensors.json)")
                continue
            yield Job(functools.partial(draw_method, f, ctx.out, model=model, block_types=types, energy_label=elabel),
                      [f, f.with_name(f.name + ".json"), grads])
    hst = ctx.results / "hybrid" / "hybrid_states.csv"
    if not hst.is_file():
        yield Skip("Fig. 1 method (hybrid)", f"no {hst} (make hybrid)")
        return
    st, _ = _table(hst, "hybrid_states", ["model", "budget", "rank", "energy", "removed_blocks"],
                   "the hybrid method figure (Fig. 1)")
    grad_side = ctx.results / "hybrid" / "gradients.safetensors.json"
    types = block_types_from_sidecar(grad_side) or (ctx.cfg.get("hybrid") or {}).get("pattern")
    side = ctx.results / "hybrid" / "hybrid_states.csv.json"
    info = (read_json(side).get("solver_info") or {}) if side.is_file() else {}
    for (model, budget), sub in st.groupby(["model", "budget"], sort=False):
        N = (info.get(budget) or {}).get("N") or (len(types) if types is not None else None)
        if types is None or N is None:
            yield Skip(f"Fig. 1 method {model} {budget}", "block types unknown (no hybrid/gradients.safetensors.json "
                       "and no profile pattern)")
            continue
        stand = "stand_in" in sub.columns and sub["stand_in"].map(_truthy).any()
        yield Job(functools.partial(draw_method, sub, ctx.out, model=model, n_blocks=int(N), block_types=types,
                                    label=budget, constraint=f"the budget {budget} (blocks of that type only)",
                                    note=f"stand-in for {_nano_id()}" if stand else None), [hst, side, grad_side])


def _plan_energy_vs(score_figure: str, draw):
    """The planner of Fig. 2 or 3 (``draw``): one panel set per model of ``state_energies.csv``."""

    def plan(ctx: FigureInputs):
        se, corr = ctx.file("state_energies.csv"), ctx.results / "correlations.csv"
        if se is None:
            yield Skip(f"{score_figure}", f"no {ctx.results / 'state_energies.csv'} (make compare, correlate stage)")
            return
        for model in dict.fromkeys(pd.read_csv(se, usecols=["model"], dtype=str)["model"]):
            yield Job(functools.partial(draw, se, ctx.out, model=model,
                                        correlations=corr if corr.is_file() else None), [se, corr])
    return plan


register_figure("energy_vs_zero_shot", "Fig. 2")(_plan_energy_vs("energy_vs_zero_shot", draw_energy_vs_zero_shot))
register_figure("energy_vs_perplexity", "Fig. 3")(_plan_energy_vs("energy_vs_perplexity", draw_energy_vs_perplexity))


@register_figure("states_map", "Fig. 4")
def _plan_states_map(ctx: FigureInputs):
    """One states map per states table of the core stages and per CBO variant's table of the comparison."""
    ev, se = ctx.file("evaluations.csv"), ctx.file("state_energies.csv")
    inputs = [ctx.results / "evaluations.csv", ctx.results / "state_energies.csv"]
    if not ctx.model_dirs():
        yield Skip("Fig. 4 states_map", f"no <model>/states_M<M>.csv under {ctx.results} (make reproduce)")
    for mdir in ctx.model_dirs():
        model = mdir.name
        for f, M in _states_files(mdir):
            yield Job(functools.partial(draw_states_map, f, ctx.out, model=model, M=M, evaluations=ev,
                                        state_energies=se, tasks=ctx.tasks), [f, *inputs])
        for f in sorted((mdir / "compare").glob("states_*_M*.csv")):
            variant, M = f.stem[len("states_"):].rsplit("_M", 1)
            if len(pd.read_csv(f, usecols=["rank"])) < 2:
                yield Skip(f"Fig. 4 states_map {model} {variant} M{M}", f"{f.name} holds one state only")
                continue
            yield Job(functools.partial(draw_states_map, f, ctx.out, model=model, variant=variant, M=int(M),
                                        evaluations=ev, state_energies=se, tasks=ctx.tasks), [f, *inputs])


@register_figure("hybrid_retention", "Fig. 5")
def _plan_hybrid_retention(ctx: FigureInputs):
    """One retention figure per model of the hybrid experiment."""
    hev = ctx.results / "hybrid" / "hybrid_evaluations.csv"
    if not hev.is_file():
        yield Skip("Fig. 5 hybrid_retention", f"no {hev} (make hybrid)")
        return
    for model in dict.fromkeys(pd.read_csv(hev, usecols=["model"], dtype=str)["model"]):
        yield Job(functools.partial(draw_hybrid_retention, hev, ctx.out, model=model), [hev])


def paper_items() -> dict[str, str]:
    """Figure file prefix → paper item, from the registry."""
    return {f.name: f.paper_item for f in FIGURES.values()}


def draw_all(results_dir: Any, figures_dir: Any, profile: str | None = None) -> list[Path]:
    """Draw every registered figure (:data:`FIGURES`) whose inputs exist under ``results_dir`` (e.g.
    ``results/mini``) into ``figures_dir``; print what was skipped and why; write ``figures.json`` (figure → paper
    item, inputs with SHA-256, notes; and the skipped figures). ``profile`` (tiny | mini | paper or a YAML path)
    supplies the benchmark order and, when no gradients sidecar records them, the hybrid layer pattern. Returns the
    PNG paths written, sorted."""
    results, out = Path(results_dir), Path(figures_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"no results folder {results}; run make reproduce PROFILE=... first")
    claim_folder(out, "figures")   # a folder of the user's is refused; the figures of an earlier run are redrawn
    ctx = FigureInputs(results, out, _profile_settings(profile))
    made: dict[str, dict] = {}
    skipped: list[dict] = []
    for spec in FIGURES.values():
        for job in spec.plan(ctx):
            if isinstance(job, Skip):
                skipped.append({"figure": job.figure, "reason": job.reason})
                continue
            d = job.draw()
            for n in d.notes:
                print(f"[figures] note: {n}")
            if d.path is None:
                skipped.append({"figure": spec.paper_item, "reason": "; ".join(d.notes) or "nothing to draw"})
                continue
            made[d.path.name] = {"paper_item": spec.paper_item, "notes": d.notes,
                                 "inputs": {str(p.relative_to(results)): input_digest(p) for p in job.inputs
                                            if p.is_file()}}
    for s in skipped:
        print(f"[figures] skipped {s['figure']}: {s['reason']}")
    earlier = (read_manifest(out) or {}).get("files", {})
    stale = [rel for rel in earlier if rel.endswith(".png") and "/" not in rel and rel not in made]
    for rel in remove_recorded(out, stale):   # an earlier drawing's figure this one does not make (e.g. of a model
        print(f"[figures] removed {rel}: an earlier drawing's, not made from these results")   # that is gone)
    write_json(out / "figures.json", {"results": portable_path(results), "profile": profile, "figures": made,
                                      "skipped": skipped})
    return sorted(out / n for n in made)


#: words of provenance keys that change on every run without changing what a figure shows (timings, hosts, dates)
VOLATILE = ("second", "created", "host", "command", "git_revision", "versions", "rss", "time", "cpus")


def _stable(x):
    if isinstance(x, dict):
        return {k: _stable(v) for k, v in sorted(x.items()) if not any(w in str(k).lower() for w in VOLATILE)}
    if isinstance(x, list):
        return [_stable(v) for v in x]
    return x


def input_digest(path: Path) -> str:
    """The SHA-256 of what a figure reads from ``path``: the bytes of a data file; for a JSON sidecar, its content
    without the fields that change on every run (timings, dates, host, command, versions — :data:`VOLATILE`), so the
    same inputs give the same ``figures.json``."""
    path = Path(path)
    if path.suffix == ".json":
        import hashlib

        try:
            rec = read_json(path)
        except ValueError:
            return file_sha256(path)
        return hashlib.sha256(json.dumps(_stable(rec), sort_keys=True, default=str).encode()).hexdigest()
    return file_sha256(path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Draw the paper's figures from a results folder (result files only).")
    ap.add_argument("--results", required=True, help="results folder, e.g. results/mini")
    ap.add_argument("--out", required=True, help="figures folder, e.g. figures/mini")
    ap.add_argument("--profile", default=None, help="tiny | mini | paper (benchmark order, hybrid pattern)")
    args = ap.parse_args(argv)
    for p in draw_all(args.results, args.out, args.profile):
        print(p)
    return 0


__all__ = ["DPI", "FIGURES", "SOURCES", "Drawn", "FigureInputs", "FigureSpec", "Job", "Skip", "paper_items",
           "register_figure", "block_types_from_sidecar", "draw_all", "input_digest",
           "draw_energy_vs_perplexity", "draw_energy_vs_score", "draw_energy_vs_zero_shot", "draw_hybrid_retention",
           "draw_method", "draw_states_map", "main"]

if __name__ == "__main__":
    sys.exit(main())

