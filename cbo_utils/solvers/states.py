"""The one result table of every solver: one row per state —

``rank``            0 = lowest energy found
``energy``          float64, recomputed exactly as ``xᵀQx + const`` on the full problem
``removed_blocks``  canonical string of the removed 0-based original block indices, e.g. ``"3 7 12"``
``solver``          ``"exact"``, ``"naive"``, ``"brute_force"``, ``"sa"`` or ``"tabu"``
``seed``            the sampler's seed (nullable ``Int64``; NA for deterministic enumeration)
``feasible``        whether the state satisfies every constraint of the problem
``tie``             energy equal (within ``1e-12·max(1,|E|)``) to that of a neighbour in the sorted list

Rows are sorted by energy, then by the ``removed_blocks`` string; ``df.attrs["solver_info"]`` holds the solver's
metadata. Also the CSV round trip of the table and its conversion to block lists / 0-1 matrices.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbo_utils.core.artifacts import (
    atomic_write_text,
    first_line,
    format_blocks,
    parse_blocks,
    read_json,
    sidecar_path,
    write_sidecar,
)
from cbo_utils.problem.ising import BlockRemovalProblem

COLUMNS = ["rank", "energy", "removed_blocks", "solver", "seed", "feasible", "tie"]


TIE_RTOL = 1e-12


def _tie_groups(E: np.ndarray) -> np.ndarray:
    """Group ids of a sorted energy array: consecutive entries within ``TIE_RTOL·max(1,|E|)`` share a group."""
    if E.size == 0:
        return np.zeros(0, dtype=np.int64)
    gap = np.diff(E) > TIE_RTOL * np.maximum(1.0, np.maximum(np.abs(E[1:]), np.abs(E[:-1])))
    return np.concatenate([[0], np.cumsum(gap)])


def results_frame(problem: BlockRemovalProblem, X: np.ndarray, solver: str, seed: int | None, k: int | None,
                   info: Mapping[str, Any]) -> pd.DataFrame:
    """The standard table from full 0/1 states ``X`` (duplicates dropped, exact energies, canonical order)."""
    X = np.asarray(X, dtype=np.int8).reshape(-1, problem.N)
    if X.shape[0]:
        X = np.unique(X, axis=0)
    E = np.asarray(problem.energy_of(X), dtype=np.float64).reshape(-1)
    feas = np.asarray(problem.feasible(X), dtype=bool).reshape(-1)
    names = np.array([format_blocks(np.flatnonzero(row)) for row in X], dtype=object)
    order = np.lexsort((names, E))  # by energy, then (exact ties) by the canonical string
    E, feas, names = E[order], feas[order], names[order]
    groups = _tie_groups(E)
    same = groups[1:] == groups[:-1]
    tie = np.zeros(E.size, dtype=bool)
    tie[1:] |= same
    tie[:-1] |= same
    if k is not None:
        E, feas, names, tie = E[:k], feas[:k], names[:k], tie[:k]
    df = pd.DataFrame({
        "rank": np.arange(E.size, dtype=np.int64),
        "energy": E.astype(np.float64),
        "removed_blocks": pd.Series(names, dtype=object).astype(str),
        "solver": solver,
        "seed": pd.array([seed] * E.size, dtype="Int64"),
        "feasible": feas,
        "tie": tie,
    }, columns=COLUMNS)
    full_info = {
        "solver": solver, "seed": seed, "N": problem.N, "M": problem.M, "energy": str(problem.energy),
        "keep": list(problem.keep), "remove": list(problem.remove),
        "only_types": None if problem.only_types is None else list(problem.only_types),
        "n_free": int(len(problem.free)), "M_free": problem.M_free, "k": k,
    }
    full_info.update(info)
    df.attrs["solver_info"] = full_info
    return df


def check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (how many lowest states to return) must be a positive integer, got {k!r}")
    return int(k)


def write_states_csv(df: pd.DataFrame, path, provenance_record: Mapping[str, Any] | None = None) -> Path:
    """Atomically write the table as CSV; with a provenance record also write the sidecar ``<path>.json``, adding
    ``df.attrs["solver_info"]`` to it under ``"solver_info"``."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"not a solver table: columns {missing} are missing (expected {COLUMNS})")
    extra = [c for c in df.columns if c not in COLUMNS]
    path = Path(path)
    atomic_write_text(path, df[COLUMNS + extra].to_csv(index=False, float_format="%.17g", lineterminator="\n"))
    if provenance_record is not None:
        record = dict(provenance_record)
        record.setdefault("solver_info", df.attrs.get("solver_info", {}))
        write_sidecar(path, record)
    return path


def read_states_csv(path) -> pd.DataFrame:
    """Read a table written by :func:`write_states_csv` (``removed_blocks`` stays a string). If the sidecar exists
    its ``solver_info`` is put back into ``df.attrs``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no states table at {path}; write one with `cbo solve ... --out {path}`")
    try:
        df = pd.read_csv(path, dtype={"removed_blocks": str, "solver": str}, keep_default_na=False,
                         na_values={"seed": [""]})
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty, not a states table from `cbo solve`; rerun `cbo solve` to write it") \
            from None
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise ValueError(f"{path} is not a states table from `cbo solve` (it cannot be read as CSV: "
                         f"{first_line(exc)[:120]})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a solver table: columns {missing} are missing")
    if df.empty:
        raise ValueError(f"{path} holds no states (only its header); rerun `cbo solve` to write them")
    side = sidecar_path(path)
    info = None
    if side.is_file():
        rec = read_json(side)
        if isinstance(rec, dict) and isinstance(rec.get("solver_info"), dict):
            info = rec["solver_info"]
    _check_states_table(path, df, info)
    df["rank"] = pd.to_numeric(df["rank"]).astype(np.int64)
    df["energy"] = pd.to_numeric(df["energy"]).astype(np.float64)
    df["seed"] = pd.array(pd.to_numeric(df["seed"]), dtype="Int64")
    for col in ("feasible", "tie"):
        if df[col].dtype != bool:
            df[col] = df[col].astype(str).str.strip().str.lower().map({"true": True, "false": False}).astype(bool)
    if info is not None:
        df.attrs["solver_info"] = info
    return df


def _check_states_table(path: Path, df: pd.DataFrame, info: Mapping[str, Any] | None) -> None:
    """Refuse a states table whose rows cannot be what `cbo solve` wrote, naming the file, the row (its CSV line) and
    the problem: non-numeric or non-finite energies; ranks that are not whole numbers 0, 1, … or repeat; seeds that
    are not whole numbers; feasible / tie other than true or false; removed blocks that do not parse, are negative,
    repeat, lie beyond the model's N blocks (from the sidecar), or whose count differs from the table's M (the
    sidecar's, else the lowest-ranked row's): such a state removes another number of blocks than was solved for."""
    def line(i) -> str:
        return f"{path}, line {int(i) + 2}"   # line 1 is the header

    def numbers(col: str) -> pd.Series:
        return pd.to_numeric(df[col].replace("", np.nan), errors="coerce").astype(np.float64)

    energy = numbers("energy")
    bad = np.flatnonzero(~np.isfinite(energy.to_numpy()))
    if bad.size:
        raise ValueError(f"{line(bad[0])}: energy {df['energy'].iloc[bad[0]]} is not a finite number "
                         f"({bad.size} such row(s)); the table is corrupt or edited — rerun `cbo solve`")
    rank = numbers("rank").to_numpy()
    bad = np.flatnonzero(~(np.isfinite(rank) & (rank >= 0) & (np.mod(rank, 1) == 0)))
    if bad.size:
        raise ValueError(f"{line(bad[0])}: rank {df['rank'].iloc[bad[0]]} is not a whole number 0 or more; "
                         "ranks are 0 (the lowest energy), 1, 2, … — rerun `cbo solve`")
    seen: dict[int, int] = {}
    for i, r in enumerate(rank.astype(np.int64)):
        if int(r) in seen:
            raise ValueError(f"{line(i)}: rank {int(r)} repeats that of line {seen[int(r)] + 2}; each state has its "
                             "own rank — the table is corrupt or edited, rerun `cbo solve`")
        seen[int(r)] = i
    seed = numbers("seed").to_numpy()
    given = df["seed"].astype(str).str.strip().replace("<NA>", "").ne("").to_numpy() & ~df["seed"].isna().to_numpy()
    bad = np.flatnonzero(given & ~(np.isfinite(seed) & (np.mod(np.nan_to_num(seed), 1) == 0)))
    if bad.size:
        raise ValueError(f"{line(bad[0])}: seed {df['seed'].iloc[bad[0]]} is not a whole number (or empty)")
    for col in ("feasible", "tie"):
        if df[col].dtype != bool:
            ok = df[col].astype(str).str.strip().str.lower().isin(["true", "false"]).to_numpy()
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise ValueError(f"{line(i)}: {col} {df[col].iloc[i]!r} must be true or false")
    N = info.get("N") if info else None
    M = info.get("M") if info else None
    N = int(N) if isinstance(N, (int, np.integer)) and not isinstance(N, bool) else None
    M = int(M) if isinstance(M, (int, np.integer)) and not isinstance(M, bool) else None
    blocks = []
    for i, text in enumerate(df["removed_blocks"]):
        try:
            b = parse_blocks(str(text))
        except ValueError as exc:
            raise ValueError(f"{line(i)}: removed_blocks {text!r}: {exc}") from None
        if any(x < 0 for x in b):
            raise ValueError(f"{line(i)}: removed_blocks {text!r} has a negative index; blocks are numbered 0..N−1")
        if len(set(b)) != len(b):
            raise ValueError(f"{line(i)}: removed_blocks {text!r} names a block more than once")
        if N is not None and b and max(b) >= N:
            raise ValueError(f"{line(i)}: removed_blocks {text!r} lies outside the model's blocks 0..{N - 1} (N = {N}, "
                             f"from {sidecar_path(path).name})")
        blocks.append(b)
    order = np.argsort(rank, kind="stable")
    if M is None:
        M = len(blocks[int(order[0])])
        whose = f"the lowest-ranked row's (line {int(order[0]) + 2})"
    else:
        whose = f"M of {sidecar_path(path).name}"
    for i, b in enumerate(blocks):
        if len(b) != M:
            raise ValueError(f"{line(i)}: removed_blocks {df['removed_blocks'].iloc[i]!r} removes {len(b)} blocks, "
                             f"but the table is for M = {M} ({whose}): an infeasible state — the table is corrupt or "
                             "edited, rerun `cbo solve`")


def states_blocks(df: pd.DataFrame) -> list[list[int]]:
    """The removed blocks of each row as lists of 0-based indices."""
    return [parse_blocks(s) for s in df["removed_blocks"]]


def states_to_matrix(df: pd.DataFrame, N: int) -> np.ndarray:
    """The rows of a solver table as an ``(n, N)`` int8 0/1 matrix."""
    out = np.zeros((len(df), int(N)), dtype=np.int8)
    for r, blocks in enumerate(states_blocks(df)):
        if blocks and (min(blocks) < 0 or max(blocks) >= N):
            raise ValueError(f"row {r} removes blocks outside 0..{N - 1}: {blocks}")
        out[r, blocks] = 1
    return out
