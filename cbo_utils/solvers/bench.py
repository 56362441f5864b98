"""Solver benchmark: exact enumeration vs simulated annealing vs tabu search (energy gap and time), N up to 80.

For every instance (:mod:`cbo_utils.solvers.instances`) and every ``M`` the benchmark solves ``min xᵀHx, Σx = M`` with

* ``exact`` — :func:`~cbo_utils.solvers.exact.exact_lowest`, only when ``C(N, M) <= exact_state_limit``;
* ``sa`` — :func:`~cbo_utils.solvers.heuristics.simulated_annealing` (fixed reads/sweeps), once per seed;
* ``tabu`` — :func:`~cbo_utils.solvers.heuristics.tabu` (fixed ``timeout_ms`` per read), once per seed;
* ``bound`` — :func:`cbo_utils.problem.bounds.lower_bound`, a certified lower bound on the optimum (the SDP-dual
  convexification), so that every heuristic answer carries a certified gap even where exact enumeration is out of
  reach (``use_bound=False`` skips it).

Output in ``out_dir`` (each file written atomically, with a provenance sidecar ``<file>.json``):

``solver_benchmark.csv``  one row per instance × M × solver × seed (columns: :data:`COLUMNS`)
``solver_benchmark.md``   the same rows as a human-readable table (one table line per row)
``states/``               the ``k`` states each solver returned (the standard solver table), from which the top-k
                          overlaps are computed

Per solver row: ``energy`` (best energy among its ``k`` states, each recomputed as ``Σ_{i,j∈S} Q_ij + const`` with
the same arithmetic for every solver, so one state always gets one number; for the ``bound`` row the lower bound),
``gap`` =
``energy − reference_energy`` where the reference is the exact optimum when exact ran (``reference = "exact"``), else
the lowest energy any solver found (``"best_found"``); ``rel_gap = gap / |reference_energy|``; ``certified_gap`` =
``energy − bound`` and ``certified_rel_gap = certified_gap / |energy|`` when a bound exists; ``time_s`` (wall time of
the solver call, after a warm-up of each solver on a tiny problem); ``n_distinct`` (distinct feasible states returned,
at most ``k``); ``n_in_topk`` (how many of them have an energy within the reference ``k`` lowest: exact's ``k`` lowest
when exact ran, else the ``k`` lowest states any solver returned); ``proven_optimal`` (exact ran and the energy equals
its optimum, or the energy is ≤ bound + ``proven_rtol``·|energy|).

Resumable: a row whose key (instance, M, solver, seed) is already in the CSV — measured on the same matrix
(``instance_sha256``) with the same settings — is not recomputed; every measurement is written (CSV, markdown and
states file) as soon as it is made, so an interrupted run loses at most the measurement in progress. The columns
that depend on other rows (reference, gaps, top-k, proven) are recomputed at every write.

    python -m cbo_utils.solvers.bench --N 32 40 52 80 --M 8 --out results/solver_bench \\
        [--gradients results/mini/smollm2/gradients.safetensors] [--zenodo DIR] [--solvers exact sa tabu] [--k 20]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbo_utils.core.artifacts import PathLike, atomic_write_text, provenance, read_json, sidecar_path, write_sidecar
from cbo_utils.problem import bounds
from cbo_utils.problem.ising import BlockRemovalProblem, energies_of_sets
from cbo_utils.solvers.heuristics import solve
from cbo_utils.solvers.instances import Instance, gradients_instance, synthetic_instance, zenodo_instances
from cbo_utils.solvers.states import read_states_csv, states_blocks, write_states_csv

__all__ = ["run_benchmark", "benchmark_markdown", "read_benchmark", "COLUMNS", "MEASURED_COLUMNS", "DERIVED_COLUMNS",
           "SOLVER_NAMES", "CSV_NAME", "MD_NAME", "main"]

CSV_NAME = "solver_benchmark.csv"
MD_NAME = "solver_benchmark.md"
STATES_DIR = "states"
#: the solvers this benchmark runs (``bound`` is added automatically when ``cbo_utils.problem.bounds`` is available)
SOLVER_NAMES = ("exact", "sa", "tabu")
_ORDER = {"exact": 0, "bound": 1, "sa": 2, "tabu": 3}
_TIE_RTOL = 1e-12

MEASURED_COLUMNS = [
    "instance", "source", "N", "M", "solver", "seed", "k", "n_states", "energy", "best_blocks", "n_distinct",
    "time_s", "solver_time_s", "device", "settings", "details", "instance_sha256", "states_file",
]
DERIVED_COLUMNS = [
    "reference", "reference_energy", "gap", "rel_gap", "bound", "certified_gap", "certified_rel_gap", "n_in_topk",
    "proven_optimal",
]
COLUMNS = MEASURED_COLUMNS + DERIVED_COLUMNS
_INT_COLUMNS = ("N", "M", "seed", "k", "n_distinct", "n_in_topk")
_FLOAT_COLUMNS = ("n_states", "energy", "time_s", "solver_time_s", "reference_energy", "gap", "rel_gap", "bound",
                  "certified_gap", "certified_rel_gap")
_STR_COLUMNS = ("instance", "source", "solver", "best_blocks", "device", "settings", "details", "instance_sha256",
                "states_file", "reference")
_DETAIL_KEYS = ("states_per_s", "torch_threads", "candidates_truncated", "resumed_chunks", "penalty_lambda",
                "n_samples", "n_infeasible", "n_distinct_raw", "n_polish_improved", "sample_time_s",
                "postprocess_time_s")

Key = tuple[str, int, str, int]  # (instance, M, solver, seed or -1)


# ====================================================================================================================
# helpers
# ====================================================================================================================

def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def _key(instance: str, M: int, solver: str, seed) -> Key:
    return (str(instance), int(M), str(solver), -1 if seed is None or pd.isna(seed) else int(seed))


def _settings_json(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def _states_name(instance: str, M: int, solver: str, seed: int | None) -> str:
    return f"{STATES_DIR}/{instance}__M{M}__{solver}" + ("" if seed is None else f"__seed{seed}") + ".csv"


def _bound_function() -> tuple[Callable, str]:
    """The certified lower bound used for the ``bound`` rows, and its name for provenance."""

    return bounds.lower_bound, "cbo_utils.problem.bounds.lower_bound"  # looked up at call time (tests patch it)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        v = v.item()
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return f"<{type(v).__name__}>"


def _as_instances(instances: Iterable[Instance | tuple[str, Any]]) -> list[Instance]:
    out = []
    for inst in instances:
        if isinstance(inst, Instance):
            out.append(inst)
        elif isinstance(inst, tuple) and len(inst) == 2:
            out.append(Instance(str(inst[0]), np.asarray(inst[1], dtype=np.float64), "custom", {}))
        else:
            raise ValueError(f"instances must be Instance objects or (name, H) pairs, got {type(inst).__name__}")
    names = [i.name for i in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"instance names must be unique (they key the rows), repeated: {dup}")
    if not out:
        raise ValueError("no instances: give synthetic sizes (--N), a gradients file (--gradients) or a Zenodo folder "
                         "(--zenodo)")
    return out


# ====================================================================================================================
# CSV in / out
# ====================================================================================================================

def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    df = df.reindex(columns=COLUMNS)
    for c in _INT_COLUMNS:
        df[c] = pd.array(pd.to_numeric(df[c], errors="coerce"), dtype="Int64")
    for c in _FLOAT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
    for c in _STR_COLUMNS:
        df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str)
    pv = df["proven_optimal"].astype(object).map(lambda v: {"True": True, "False": False, True: True, False: False}.get(
        v if isinstance(v, bool) else str(v), pd.NA))
    df["proven_optimal"] = pd.array(pv, dtype="boolean")
    return df


def read_benchmark(path: PathLike) -> pd.DataFrame:
    """The benchmark table from ``solver_benchmark.csv`` (or its folder), with typed columns."""
    path = Path(path)
    if path.is_dir():
        path = path / CSV_NAME
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in MEASURED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a solver benchmark table: columns {missing} are missing; use another --out "
                         f"folder or delete the file")
    return _normalise(df.replace("", np.nan))


def _sort(df: pd.DataFrame) -> pd.DataFrame:
    order = df.assign(_s=df["solver"].map(lambda s: _ORDER.get(s, 9)), _seed=df["seed"].fillna(-1))
    order = order.sort_values(["N", "instance", "M", "_s", "_seed"], kind="stable")
    return order.drop(columns=["_s", "_seed"]).reset_index(drop=True)


def _csv_text(df: pd.DataFrame) -> str:
    return df[COLUMNS].to_csv(index=False, float_format="%.17g", lineterminator="\n")


# ====================================================================================================================
# derived columns
# ====================================================================================================================

def _states(out_dir: Path, rel: str, cache: dict[str, pd.DataFrame]) -> pd.DataFrame | None:
    if rel not in cache:
        path = out_dir / rel
        cache[rel] = read_states_csv(path) if rel and path.is_file() else None
    return cache[rel]


def _derive(df: pd.DataFrame, out_dir: Path, cache: dict[str, pd.DataFrame], proven_rtol: float) -> pd.DataFrame:
    """Recompute the reference, gaps, top-k overlaps and ``proven_optimal`` of every row from the measured columns."""
    df = df.copy()
    for c in DERIVED_COLUMNS:
        df[c] = np.nan
    df = _normalise(df)
    for (_, _), idx in df.groupby(["instance", "M"], sort=False).groups.items():
        g = df.loc[idx]
        sol = g[g["solver"] != "bound"]
        exact = sol[sol["solver"] == "exact"]
        bound_rows = g[g["solver"] == "bound"]
        bound = float(bound_rows["energy"].iloc[0]) if len(bound_rows) else np.nan
        if len(exact):
            ref_name, ref_E = "exact", float(exact["energy"].iloc[0])
            ref_states = _states(out_dir, exact["states_file"].iloc[0], cache)
            ref_E_sorted = None if ref_states is None else np.sort(
                ref_states.loc[ref_states["feasible"], "energy"].to_numpy(np.float64))
        else:
            ref_name = "best_found"
            ref_E = float(sol["energy"].min()) if len(sol) and sol["energy"].notna().any() else np.nan
            pool: dict[str, float] = {}
            for rel in sol["states_file"]:
                st = _states(out_dir, rel, cache)
                if st is not None:
                    for b, e in zip(st.loc[st["feasible"], "removed_blocks"], st.loc[st["feasible"], "energy"]):
                        pool[b] = float(e)
            ref_E_sorted = np.sort(np.fromiter(pool.values(), dtype=np.float64)) if pool else None
        if np.isfinite(bound) and len(sol) and np.isfinite(ref_E):
            lowest = float(sol["energy"].min())
            if bound > lowest + proven_rtol * max(abs(lowest), abs(bound)):
                raise ValueError(f"{g['instance'].iloc[0]} M={int(g['M'].iloc[0])}: the lower bound {bound!r} from "
                                 f"cbo_utils.problem.bounds exceeds the energy {lowest!r} of a feasible state "
                                 "a solver found, "
                                 f"so it is not a valid bound; fix lower_bound (or run with --no-bound)")
        for i in idx:
            row = df.loc[i]
            if row["solver"] == "bound":
                df.at[i, "bound"] = bound
                continue
            E = float(row["energy"])
            df.at[i, "reference"] = ref_name
            df.at[i, "reference_energy"] = ref_E
            df.at[i, "gap"] = E - ref_E
            df.at[i, "rel_gap"] = (E - ref_E) / abs(ref_E) if ref_E != 0 else np.nan
            if np.isfinite(bound):
                df.at[i, "bound"] = bound
                df.at[i, "certified_gap"] = E - bound
                df.at[i, "certified_rel_gap"] = (E - bound) / abs(E) if E != 0 else np.nan
            st = _states(out_dir, row["states_file"], cache)
            if st is not None and ref_E_sorted is not None and ref_E_sorted.size:
                kk = int(row["k"])
                thr = float(ref_E_sorted[min(kk, ref_E_sorted.size) - 1])
                thr += _TIE_RTOL * max(1.0, abs(thr))
                e = st.loc[st["feasible"], "energy"].to_numpy(np.float64)
                df.at[i, "n_in_topk"] = int((e <= thr).sum())
            tol = proven_rtol * abs(E)
            proven = row["solver"] == "exact" or (ref_name == "exact" and E <= ref_E + tol) or (
                np.isfinite(bound) and E <= bound + proven_rtol * max(abs(E), abs(bound)))
            df.at[i, "proven_optimal"] = bool(proven)
    return _normalise(df)


# ====================================================================================================================
# markdown
# ====================================================================================================================

def _fmt(v, spec: str, empty: str = "–") -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return empty
    return format(v, spec)


def _fmt_gap(v) -> str:
    if v is None or pd.isna(v):
        return "–"
    return "0" if v == 0 else f"{v:.3g}"


def _fmt_count(v) -> str:
    if v is None or pd.isna(v):
        return "–"
    return f"{int(v):,}" if v < 1e7 else f"{v:.3g}"


def benchmark_markdown(df: pd.DataFrame) -> str:
    """The benchmark as a markdown document: a short legend and one table line per row of ``df``."""
    head = ["instance", "N", "M", "solver", "seed", "C(N,M)", "energy", "gap", "rel. gap", "ref.", "cert. gap",
            "proven", "in top-k", "distinct", "time (s)", "device"]
    lines = [
        "# Solver benchmark: exact enumeration vs simulated annealing vs tabu",
        "",
        "`energy`: lowest `xᵀHx` (Σx = M) among the states a solver returned (`bound` row: the certified lower bound). "
        "`gap` = energy − reference energy, where the reference (`ref.`) is the exact optimum when exact enumeration "
        "ran, else the lowest energy any solver found (`best`); `rel. gap` = gap / |reference|. `cert. gap` = energy − "
        "lower bound. `proven`: optimal by exact enumeration or by the bound. `in top-k`: how many of the solver's "
        "states lie within the reference k lowest (exact's, else the best any solver found); `distinct`: distinct "
        "feasible states returned. `time`: wall time of the solver call after a warm-up.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for _, r in df.iterrows():
        is_bound = r["solver"] == "bound"
        kk = "" if pd.isna(r["k"]) else f"/{int(r['k'])}"
        cells = [
            str(r["instance"]), str(int(r["N"])), str(int(r["M"])), str(r["solver"]),
            "–" if pd.isna(r["seed"]) else str(int(r["seed"])),
            _fmt_count(r["n_states"]), _fmt(r["energy"], ".8g"),
            _fmt_gap(r["gap"]), _fmt_gap(r["rel_gap"]),
            {"exact": "exact", "best_found": "best"}.get(r["reference"], "–"),
            _fmt_gap(r["certified_gap"]),
            "–" if is_bound or pd.isna(r["proven_optimal"]) else ("yes" if r["proven_optimal"] else "no"),
            "–" if pd.isna(r["n_in_topk"]) else f"{int(r['n_in_topk'])}{kk}",
            _fmt(r["n_distinct"], "d"), _fmt(r["time_s"], ".3g"), r["device"] or "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ====================================================================================================================
# the benchmark
# ====================================================================================================================

def _warmup(solver: str, exact_device, bound_fn) -> None:
    """One tiny run so that imports, thread pools and CUDA initialisation are not timed."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(32, 8))
    problem = BlockRemovalProblem.from_hessian(A.T @ A / 32, 2)
    if solver == "exact":
        solve(problem, "exact", k=2, device=exact_device, progress=False)
    elif solver == "sa":
        solve(problem, "sa", k=2, seed=0, num_reads=2, num_sweeps=10)
    elif solver == "tabu":
        solve(problem, "tabu", k=2, seed=0, num_reads=1, timeout_ms=5)
    elif solver == "bound" and bound_fn is not None:
        bound_fn(problem, time_limit=1.0)


def _sidecar_record(params: dict, instances: list[Instance], previous: dict | None, bound_status: str,
                    n_rows: int) -> dict:
    known = {r["name"]: r for r in (previous or {}).get("instances", []) if isinstance(r, dict) and "name" in r}
    known.update({i.name: i.record() for i in instances})
    import torch

    return provenance("solver_benchmark", parameters=params, instances=list(known.values()), bound=bound_status,
                      rows=n_rows, torch_threads=torch.get_num_threads(),
                      omp_num_threads=os.environ.get("OMP_NUM_THREADS"))


def run_benchmark(instances: Iterable[Instance | tuple[str, Any]], M_values: Sequence[int],
                  solvers: Sequence[str] = SOLVER_NAMES, k: int = 20, seeds: Sequence[int] = (0,),
                  exact_state_limit: float = 3e10, time_limit: float = 60.0,
                  out_dir: PathLike = "results/solver_bench", *, sa_reads: int = 1000, sa_sweeps: int = 1000,
                  tabu_reads: int = 20, tabu_timeout_ms: int = 200, exact_device: str | None = None,
                  use_bound: bool = True, proven_rtol: float = 1e-8, progress: bool = True,
                  warmup: bool = True) -> pd.DataFrame:
    """Run the benchmark (see the module docstring) and return the full table (typed, with derived columns).

    ``instances``: :class:`~cbo_utils.solvers.instances.Instance` objects or ``(name, H)`` pairs. ``M_values``: numbers
    of blocks to remove (each must satisfy ``1 <= M < N`` for every instance). ``solvers``: a subset of ``("exact",
    "sa", "tabu")``. ``seeds``: sampler seeds (``sa`` and ``tabu`` run once per seed; exact and the bound are
    deterministic and run once). ``exact_state_limit``: run exact only when ``C(N, M)`` is at most this.
    ``time_limit``: seconds given to ``cbo_utils.problem.bounds.lower_bound`` (with ``use_bound``).
    ``sa_reads``/``sa_sweeps``, ``tabu_reads``/``tabu_timeout_ms``: sampler budgets. ``exact_device``: torch device
    for exact (``None`` = CUDA when available).

    ``df.attrs`` holds ``n_measured`` and ``n_resumed`` (rows measured now / found in the CSV), ``csv``,
    ``markdown`` and ``bound`` (whether and why the bound was used).
    """
    insts = _as_instances(instances)
    solvers = [str(s).lower() for s in solvers]
    unknown = sorted(set(solvers) - set(SOLVER_NAMES))
    if unknown or not solvers:
        raise ValueError(f"unknown solvers {unknown or solvers}: choose from {', '.join(SOLVER_NAMES)}")
    M_values = [int(M) for M in M_values]
    if not M_values:
        raise ValueError("give at least one M (number of blocks to remove)")
    bad = [(i.name, i.N, M) for i in insts for M in M_values if not 1 <= M < i.N]
    if bad:
        raise ValueError(f"M must satisfy 1 <= M < N for every instance; invalid (instance, N, M): {bad}")
    seeds = [int(s) for s in seeds]
    if not seeds or any(not 0 <= s < 2 ** 32 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers in [0, 2^32), got {seeds}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    out = Path(out_dir)
    csv_path, md_path = out / CSV_NAME, out / MD_NAME

    bound_fn, bound_status = _bound_function() if use_bound else (None, "disabled (use_bound=False)")
    settings = {
        "exact": {"k": k},
        "sa": {"k": k, "num_reads": int(sa_reads), "num_sweeps": int(sa_sweeps)},
        "tabu": {"k": k, "num_reads": int(tabu_reads), "timeout_ms": int(tabu_timeout_ms)},
        "bound": {"time_limit": float(time_limit)},
    }
    params = {"M_values": M_values, "solvers": solvers, "k": k, "seeds": seeds,
              "exact_state_limit": float(exact_state_limit), "time_limit": float(time_limit),
              "sa_reads": int(sa_reads), "sa_sweeps": int(sa_sweeps), "tabu_reads": int(tabu_reads),
              "tabu_timeout_ms": int(tabu_timeout_ms), "exact_device": exact_device, "use_bound": bool(use_bound),
              "proven_rtol": float(proven_rtol), "warmup": bool(warmup),
              "instances": [i.name for i in insts]}

    rows: dict[Key, dict[str, Any]] = {}
    if csv_path.exists():
        for r in read_benchmark(csv_path)[MEASURED_COLUMNS].to_dict("records"):
            rows[_key(r["instance"], r["M"], r["solver"], r["seed"])] = r
    previous = read_json(sidecar_path(csv_path)) if sidecar_path(csv_path).is_file() else None
    cache: dict[str, pd.DataFrame] = {}

    # ---- the plan: exact first (so later progress lines can show gaps), then the bound, then the samplers
    plan: list[tuple[Instance, int, str, int | None]] = []
    for inst in insts:
        for M in M_values:
            n_states = math.comb(inst.N, M)
            if "exact" in solvers:
                if n_states <= exact_state_limit:
                    plan.append((inst, M, "exact", None))
                elif _key(inst.name, M, "exact", None) not in rows:
                    _say(progress, f"skip exact: {inst.name} M={M} has C({inst.N},{M}) = {n_states:.3g} states > "
                                   f"exact_state_limit {exact_state_limit:.3g}")
            if bound_fn is not None:
                plan.append((inst, M, "bound", None))
            plan.extend((inst, M, s, seed) for seed in seeds for s in ("sa", "tabu") if s in solvers)

    by_name = {i.name: i for i in insts}
    for (name, M, solver, seed), old in rows.items():
        inst = by_name.get(name)
        if inst is not None and old["instance_sha256"] != inst.sha256:
            raise ValueError(f"{csv_path}: the row {name} M={M} {solver}" + ("" if seed < 0 else f" seed={seed}")
                             + f" was measured on a different matrix (sha256 {old['instance_sha256'][:12]}… vs "
                             f"{inst.sha256[:12]}…) than this run's instance {name}; use a fresh --out folder or "
                             f"delete those rows")
    todo = []
    n_resumed = 0
    for inst, M, solver, seed in plan:
        old = rows.get(_key(inst.name, M, solver, seed))
        if old is None:
            todo.append((inst, M, solver, seed))
            continue
        where = f"{csv_path}: the row {inst.name} M={M} {solver}" + ("" if seed is None else f" seed={seed}")
        if json.loads(old["settings"]) != settings[solver]:
            raise ValueError(f"{where} was measured with settings {old['settings']}, this run asks for "
                             f"{_settings_json(settings[solver])}; use a fresh --out folder, the same settings, or "
                             f"delete those rows")
        if solver != "bound" and not (out / old["states_file"]).is_file():
            todo.append((inst, M, solver, seed))  # the measurement is incomplete without its states: redo it
            continue
        n_resumed += 1
    if n_resumed:
        _say(progress, f"resume: {n_resumed} of {len(plan)} measurements already in {csv_path}")

    def write_all() -> pd.DataFrame:
        df = _derive(_sort(pd.DataFrame(list(rows.values()), columns=MEASURED_COLUMNS)), out, cache, proven_rtol)
        record = _sidecar_record(params, insts, previous, bound_status, len(df))
        atomic_write_text(csv_path, _csv_text(df))
        write_sidecar(csv_path, record)
        atomic_write_text(md_path, benchmark_markdown(df))
        write_sidecar(md_path, record)
        return df

    warmed: set[str] = set()
    problems: dict[tuple[str, int], BlockRemovalProblem] = {}
    df = None
    for n, (inst, M, solver, seed) in enumerate(todo, 1):
        if warmup and solver not in warmed:
            _warmup(solver, exact_device, bound_fn)
        warmed.add(solver)
        problem = problems.get((inst.name, M))
        if problem is None:
            problem = problems[(inst.name, M)] = BlockRemovalProblem.from_hessian(inst.H, M)
        n_states = math.comb(inst.N, M)
        tag = f"[{n}/{len(todo)}] {inst.name} M={M} {solver}" + ("" if seed is None else f" seed={seed}")
        row: dict[str, Any] = {"instance": inst.name, "source": inst.source, "N": inst.N, "M": M, "solver": solver,
                               "seed": seed, "n_states": float(n_states), "settings": _settings_json(settings[solver]),
                               "instance_sha256": inst.sha256}
        if solver == "exact":
            _say(progress, f"{tag}: enumerating C({inst.N},{M}) = {n_states:.3g} states …")
        if solver == "bound":
            t0 = time.perf_counter()
            res = bound_fn(problem, time_limit=float(time_limit))
            wall = time.perf_counter() - t0
            value = res.get("bound") if isinstance(res, dict) else None
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(value):
                raise ValueError(f"cbo_utils.problem.bounds.lower_bound returned {res!r} for {inst.name} M={M}; "
                                 "expected a "
                                 f"dict with a finite number under 'bound'")
            details = {str(a): _jsonable(b) for a, b in res.items() if a != "bound"}
            row.update({"energy": float(value), "time_s": wall, "details": json.dumps(details, sort_keys=True),
                        "best_blocks": "", "device": "", "states_file": "", "k": pd.NA})
        else:
            kw: dict[str, Any] = {}
            if solver == "exact":
                kw = {"device": exact_device, "progress": progress}
            elif solver == "sa":
                kw = {"num_reads": int(sa_reads), "num_sweeps": int(sa_sweeps)}
            else:
                kw = {"num_reads": int(tabu_reads), "timeout_ms": int(tabu_timeout_ms)}
            t0 = time.perf_counter()
            states = solve(problem, solver=solver, k=k, seed=0 if seed is None else seed, **kw)
            wall = time.perf_counter() - t0
            info = states.attrs.get("solver_info", {})
            rel = _states_name(inst.name, M, solver, seed)
            write_states_csv(states, out / rel, provenance(
                "solver_benchmark_states", parameters={"instance": inst.name, "M": M, "solver": solver, "seed": seed,
                                                       **settings[solver]}, instance=inst.record()))
            cache[rel] = read_states_csv(out / rel)
            feas = states[states["feasible"]]
            # the same arithmetic for every solver (the tables' batched energies can differ in the last bit for the
            # same state, which would make gaps of −1e-18)
            E = energies_of_sets(problem.Q, states_blocks(feas), problem.const) if len(feas) else np.zeros(0)
            best = int(np.argmin(E)) if E.size else -1
            row.update({
                "k": k, "energy": float(E[best]) if E.size else np.nan,
                "best_blocks": str(feas["removed_blocks"].iloc[best]) if E.size else "",
                "n_distinct": int(len(feas)), "time_s": wall, "solver_time_s": float(info.get("time_s", np.nan)),
                "device": str(info.get("device", "cpu")), "states_file": rel,
                "details": json.dumps({a: _jsonable(info[a]) for a in _DETAIL_KEYS if a in info}, sort_keys=True),
            })
        rows[_key(inst.name, M, solver, seed)] = row
        df = write_all()
        r = df[(df["instance"] == inst.name) & (df["M"] == M) & (df["solver"] == solver)
               & (df["seed"].fillna(-1) == (-1 if seed is None else seed))].iloc[0]
        what = "bound" if solver == "bound" else "E"
        gap = "" if solver == "bound" else f" gap={_fmt_gap(r['gap'])} (vs {r['reference']})"
        _say(progress, f"{tag}: {what}={r['energy']:.10g}{gap} {wall:.3g} s"
                       + (f" on {r['device']}" if solver == "exact" else ""))
    if df is None:
        if rows and not csv_path.exists():
            df = write_all()
        else:
            df = _derive(_sort(pd.DataFrame(list(rows.values()), columns=MEASURED_COLUMNS)), out, cache, proven_rtol)
    df.attrs.update({"n_measured": len(todo), "n_resumed": n_resumed, "csv": str(csv_path), "markdown": str(md_path),
                     "bound": bound_status})
    if csv_path.exists():
        _say(progress, f"done: {len(todo)} measured, {n_resumed} resumed → {csv_path}, {md_path}")
    else:
        _say(progress, "done: nothing to measure (every exact run is over exact_state_limit?), nothing written")
    return df


# ====================================================================================================================
# CLI
# ====================================================================================================================

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cbo_utils.solvers.bench",
                                 description="Exact vs simulated annealing vs tabu on block-removal instances: energy "
                                             "gap and time (resumable; writes solver_benchmark.csv and .md).")
    ap.add_argument("--N", type=int, nargs="*", default=[], help="sizes of synthetic instances (e.g. 32 40 52 80)")
    ap.add_argument("--M", type=int, nargs="+", required=True, help="numbers of blocks to remove")
    ap.add_argument("--out", default="results/solver_bench", help="output folder (default: %(default)s)")
    ap.add_argument("--gradients", nargs="*", default=[], help="gradients files written by `cbo gradients`")
    ap.add_argument("--zenodo", default=None, help="folder with the published *.pt gradient matrices")
    ap.add_argument("--solvers", nargs="+", default=list(SOLVER_NAMES), choices=SOLVER_NAMES)
    ap.add_argument("--k", type=int, default=20, help="states kept per solver (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampler seeds (default: 0)")
    ap.add_argument("--exact-state-limit", type=float, default=3e10,
                    help="run exact only when C(N,M) <= this (default: %(default)g)")
    ap.add_argument("--exact-device", default=None, help="torch device for exact (default: cuda when available)")
    ap.add_argument("--sa-reads", type=int, default=1000)
    ap.add_argument("--sa-sweeps", type=int, default=1000)
    ap.add_argument("--tabu-reads", type=int, default=20)
    ap.add_argument("--tabu-timeout-ms", type=int, default=200, help="tabu time per read in ms (default: 200)")
    ap.add_argument("--time-limit", type=float, default=60.0,
                    help="seconds for the certified bound, cbo_utils.problem.bounds.lower_bound (default: 60)")
    ap.add_argument("--proven-rtol", type=float, default=1e-8,
                    help="a heuristic's energy counts as proven optimal when <= bound + this × |energy| "
                         "(default: %(default)g)")
    ap.add_argument("--no-bound", action="store_true", help="skip the certified lower bound")
    ap.add_argument("--instance-seed", type=int, default=0, help="seed of the synthetic instances (default: 0)")
    ap.add_argument("--samples", type=int, default=2048, help="samples of the synthetic gradients (default: 2048)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)

    insts: list[Instance] = [synthetic_instance(N, seed=args.instance_seed, samples=args.samples) for N in args.N]
    insts += [gradients_instance(p) for p in args.gradients]
    if args.zenodo:
        insts += zenodo_instances(args.zenodo)
    try:
        run_benchmark(insts, args.M, solvers=args.solvers, k=args.k, seeds=args.seeds,
                      exact_state_limit=args.exact_state_limit, time_limit=args.time_limit, out_dir=args.out,
                      sa_reads=args.sa_reads, sa_sweeps=args.sa_sweeps, tabu_reads=args.tabu_reads,
                      tabu_timeout_ms=args.tabu_timeout_ms, exact_device=args.exact_device,
                      use_bound=not args.no_bound, proven_rtol=args.proven_rtol, progress=not args.quiet)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
