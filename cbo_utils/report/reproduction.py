"""The reproduction report: a run folder (``make reproduce`` → ``runs/<profile>/``) compared, cell by cell, with the
committed reference (``results/<profile>/``), so that a reader can tell a reproduction from a re-render.

    python -m cbo_utils.report.reproduction --run runs/mini --reference results/mini [--rtol 1e-6]

writes ``<run>/reproduction.md`` and ``<run>/reproduction.json`` (inside the claimed run folder, through the atomic
writers: recorded in its manifest) and prints a short summary.

**Which tables.** Every result table of the reference, its subfolders included (``hybrid/``): the ``*.csv`` files and
the JSON results (``development.json``, …). Not compared: provenance sidecars (``x.csv.json``, any ``name.ext.json``),
the folder records (``.cbo-manifest.json``, ``reproduce_manifest.json``, ``figures.json``, ``reproduction.json``),
reports rendered from the tables (``*.md``), and the folders ``logs/`` and ``figures/`` and folders that hold a
model (a ``config.json``) or another kind of cbo output (their own manifest).

**Rows.** A CSV table's rows are aligned on their *key*, made of its identifying columns — those whose reference
values are not floats (text, booleans, integers; never a timing column, never an all-empty column): all of those
with a usual key name (model, method, variant, M, budget, state, kind, task, metric, retrained, seed, rank, window),
then as few of the others, in column order, as make the reference's rows unique (``model, method, M, seed`` in
``selections.csv``; ``model, M, removed_blocks`` in ``state_perplexities.csv``, where the removed blocks name the
state). The other columns are values, so a changed ``removed_blocks`` of a selection is a differing cell,
not a missing row. Rows whose key repeats are told
apart by their order of appearance. A JSON table has one row per leaf, keyed by its path (``dev_log_ppl/smollm2/…``).

**Cells.** *identical*: the same text, or numbers with the same bits (``1.0`` and ``1`` alike; both NaN);
*timing*: a number in a timing column (its name says seconds, time, wall, latency, tokens_per_s, peak_rss, …) —
never a difference, reported as the ratio run / reference; *within tolerance*: numbers with
``|run − reference| ≤ max(atol, rtol · max(|run|, |reference|))`` (default ``rtol`` 1e-6, ``atol`` 0: summation order
depends on the thread count), or JSON-valued text whose leaves agree that way; *differs*: anything else (with the
largest absolute and relative difference and the rows). Rows only in the run or only in the reference are listed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cbo_utils.core.artifacts import MANIFEST, atomic_write_text, claim_folder, read_manifest, write_json

RTOL = 1e-6
ATOL = 0.0
#: how many differing cells, and how many missing/extra rows, the report shows per table (the counts are complete)
SHOW = 10
KEEP = 200   # … and keeps in the JSON
#: what is never a result table
SKIP_FILES = {MANIFEST, "reproduce_manifest.json", "figures.json", "reproduction.json"}
SKIP_DIRS = {"logs", "figures"}
_TIMING_WORDS = ("second", "time", "wall", "latency", "tokens_per_s", "per_s", "peak_rss", "rss", "throughput")
_TIMING_TOKENS = {"s", "ms", "sec", "secs", "us"}
_INT = re.compile(r"[+-]?\d+")

#: the names of the columns that identify a row in cbo's tables: tried first when inferring a key (a selection's
#: ``removed_blocks`` is then a value, and a key only where nothing else tells the rows apart)
KEY_NAMES = ("model", "method", "variant", "M", "budget", "state", "kind", "task", "metric", "retrained", "seed",
             "rank", "window")
IDENTICAL, WITHIN, TIMING, DIFFERS = "identical", "within tolerance", "timing", "differs"


def is_timing(column: str) -> bool:
    """Whether a column (or a JSON leaf's name) holds a measured time or rate, compared only by ratio."""
    name = column.lower()
    return any(w in name for w in _TIMING_WORDS) or bool(_TIMING_TOKENS & set(re.split(r"[^a-z0-9]+", name)))


def _number(v: Any) -> float | None:
    """A cell as a number, or None (text, booleans, empty cells)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    s = str(v).strip()
    if not s or s.lower() in ("true", "false"):
        return None
    try:
        return float(s)
    except ValueError:
        return None


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _same_bits(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or struct.pack("<d", a) == struct.pack("<d", b)


def _leaves(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """The leaves of a JSON document as ``(path, value)``, paths joined by ``/`` (an empty container is a leaf)."""
    if isinstance(obj, (Mapping, list)) and not obj:
        yield prefix, json.dumps(obj)
    elif isinstance(obj, Mapping):
        for k in obj:
            yield from _leaves(obj[k], f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, x in enumerate(obj):
            yield from _leaves(x, f"{prefix}/{i}" if prefix else str(i))
    else:
        yield prefix, obj


def compare_cells(run: Any, ref: Any, *, timing: bool = False, rtol: float = RTOL, atol: float = ATOL) -> dict:
    """Classify one cell: ``{"class": identical | within tolerance | timing | differs, ...}`` with ``abs``/``rel``
    (numbers) or ``ratio`` (timings)."""
    if _empty(run) and _empty(ref):
        return {"class": IDENTICAL}
    a, b = _number(run), _number(ref)
    if a is not None and b is not None:
        if timing:
            return {"class": TIMING, "ratio": a / b if b != 0 else (1.0 if a == 0 else math.inf)}
        if _same_bits(a, b):
            return {"class": IDENTICAL}
        diff = abs(a - b)
        scale = max(abs(a), abs(b))
        rel = diff / scale if scale and math.isfinite(diff) else (0.0 if diff == 0 else math.inf)
        if math.isfinite(diff) and diff <= max(atol, rtol * scale):
            return {"class": WITHIN, "abs": diff, "rel": rel}
        return {"class": DIFFERS, "abs": diff if math.isfinite(diff) else math.inf, "rel": rel}
    if a is None and b is None and str(run) == str(ref):
        return {"class": IDENTICAL}
    if isinstance(run, str) and isinstance(ref, str) and run.strip()[:1] in "{[" and ref.strip()[:1] in "{[":
        try:   # JSON-valued text (a selection's detail): its leaves compared like cells
            la, lb = list(_leaves(json.loads(run))), list(_leaves(json.loads(ref)))
        except ValueError:
            la = lb = None
        if la is not None and [k for k, _ in la] == [k for k, _ in lb]:
            cls = [compare_cells(x, y, timing=is_timing(k), rtol=rtol, atol=atol)["class"]
                   for (k, x), (_, y) in zip(la, lb)]
            if DIFFERS not in cls:
                return {"class": WITHIN}
    return {"class": DIFFERS}


# --------------------------------------------------------------------------------------------------------- tables
def result_tables(folder: Path) -> list[str]:
    """The result tables of a results folder (paths relative to it, posix), by the rule of the module docstring."""
    folder = Path(folder)
    found: list[str] = []

    def walk(d: Path, top: bool) -> None:
        if not top:
            if d.name in SKIP_DIRS or d.is_symlink() or (d / "config.json").is_file():
                return
            man = read_manifest(d) if (d / MANIFEST).is_file() else None
            if man is not None and man.get("output") != "results":
                return
        for p in sorted(d.iterdir()):
            if p.is_dir():
                walk(p, False)
            elif p.is_file() and not p.name.startswith(".") and p.name not in SKIP_FILES:
                if p.suffix == ".csv" or (p.suffix == ".json" and not Path(p.stem).suffix):
                    found.append(p.relative_to(folder).as_posix())

    walk(folder, True)
    return found


def read_table(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)`` of a CSV (cells as text) or a JSON table (one row per leaf: ``path``, ``value``)."""
    path = Path(path)
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        return ["path", "value"], [{"path": k, "value": v} for k, v in _leaves(doc)]
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [dict(r) for r in reader]
        return list(reader.fieldnames or []), rows


def _column_kind(values: Sequence[Any]) -> str:
    vals = [v for v in values if not _empty(v)]
    if not vals:
        return "empty"
    nums = [_number(v) for v in vals]
    if any(n is None for n in nums):
        return "text"
    if all(isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and _INT.fullmatch(v.strip())
           for v in vals):
        return "int"
    return "float"


def infer_key(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The key columns of a table (see the module docstring): of its identifying columns (text, booleans, integers;
    not timings, not all empty), those with a usual key name (:data:`KEY_NAMES`), and then as few of the others, in
    column order, as make ``rows`` unique — all of them when none does (the rows are then told apart by order)."""
    if list(columns) == ["path", "value"]:
        return ["path"]
    ident = [c for c in columns if not is_timing(c) and _column_kind([r.get(c) for r in rows]) in ("text", "int")]
    named, others = [c for c in ident if c in KEY_NAMES], [c for c in ident if c not in KEY_NAMES]
    for n in range(len(others) + 1):
        keys = [tuple(str(r.get(c, "")) for c in named + others[:n]) for r in rows]
        if len(set(keys)) == len(keys):
            return named + others[:n]
    return named + others


def _keyed(rows: Sequence[Mapping[str, Any]], key: Sequence[str]) -> dict[tuple, Mapping[str, Any]]:
    out: dict[tuple, Mapping[str, Any]] = {}
    seen: dict[tuple, int] = {}
    for r in rows:
        k = tuple(str(r.get(c, "")) for c in key)
        n = seen.get(k, 0)
        seen[k] = n + 1
        out[(*k, n)] = r
    return out


def _label(key: Sequence[str], k: tuple) -> str:
    if not key:   # no identifying column: rows aligned by order
        return f"row {k[-1] + 1}"
    return ", ".join(f"{c}={v}" for c, v in zip(key, k)) + (f" (#{k[-1] + 1})" if k[-1] else "")


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def compare_table(run_file: Path, ref_file: Path, *, rtol: float = RTOL, atol: float = ATOL) -> dict[str, Any]:
    """One table of the run against the same table of the reference (see the module docstring)."""
    ref_cols, ref_rows = read_table(ref_file)
    run_cols, run_rows = read_table(run_file)
    key = infer_key(ref_cols, ref_rows)
    json_table = ref_cols == ["path", "value"]
    a, b = _keyed(run_rows, key), _keyed(ref_rows, key)
    common = [k for k in b if k in a]
    values = [c for c in ref_cols if c not in key and c in run_cols]
    counts = {IDENTICAL: 0, WITHIN: 0, TIMING: 0, DIFFERS: 0}
    ratios: dict[str, list[float]] = {}
    diff_cols: dict[str, dict[str, Any]] = {}
    diffs: list[dict[str, Any]] = []
    max_within = 0.0
    for k in common:
        r, q = a[k], b[k]
        for c in values:
            name = _leaf_name(q.get("path", "")) if json_table else c
            timing = is_timing(name)
            res = compare_cells(r.get(c), q.get(c), timing=timing, rtol=rtol, atol=atol)
            cls = res["class"]
            counts[cls] += 1
            col = name if json_table and timing else c
            if cls == TIMING:
                ratios.setdefault(col, []).append(res["ratio"])
            elif cls == WITHIN:
                max_within = max(max_within, res.get("rel", 0.0))
            elif cls == DIFFERS:
                d = diff_cols.setdefault(col, {"cells": 0, "max_abs": None, "max_rel": None})
                d["cells"] += 1
                for m in ("abs", "rel"):
                    if m in res:
                        d[f"max_{m}"] = max(d[f"max_{m}"] or 0.0, res[m])
                diffs.append({"row": _label(key, k), "column": c, "run": r.get(c), "reference": q.get(c),
                              "abs": res.get("abs"), "rel": res.get("rel")})
    # the worst first: text differences (no magnitude) and then by relative difference
    diffs.sort(key=lambda d: -(math.inf if d["rel"] is None else d["rel"]))
    all_ratios = [x for v in ratios.values() for x in v if math.isfinite(x)]
    only_ref = [_label(key, k) for k in b if k not in a]
    only_run = [_label(key, k) for k in a if k not in b]
    for d in diff_cols.values():
        d["max_abs"] = None if d["max_abs"] is None else _finite(d["max_abs"])
        d["max_rel"] = None if d["max_rel"] is None else _finite(d["max_rel"])
    return {
        "key": list(key), "rows_reference": len(ref_rows), "rows_run": len(run_rows), "rows_compared": len(common),
        "cells": {**counts}, "max_rel_within": max_within,
        "timing": {"cells": counts[TIMING], "median_ratio": statistics.median(all_ratios) if all_ratios else None,
                   "min_ratio": min(all_ratios) if all_ratios else None,
                   "max_ratio": max(all_ratios) if all_ratios else None,
                   "columns": {c: _median([x for x in v if math.isfinite(x)]) for c, v in ratios.items()}},
        "differs": {"cells": counts[DIFFERS], "columns": diff_cols,
                    "examples": [{**d, "abs": None if d["abs"] is None else _finite(d["abs"]),
                                  "rel": None if d["rel"] is None else _finite(d["rel"])} for d in diffs[:KEEP]]},
        "rows_only_reference": {"count": len(only_ref), "rows": only_ref[:KEEP]},
        "rows_only_run": {"count": len(only_run), "rows": only_run[:KEEP]},
        "columns_only_reference": [c for c in ref_cols if c not in run_cols],
        "columns_only_run": [c for c in run_cols if c not in ref_cols],
    }


def _leaf_name(path: str) -> str:
    """The name a JSON leaf's timing check reads: the last path component that is not a list index."""
    return next((p for p in reversed(str(path).split("/")) if not p.isdigit()), "")


def _check_folder(path: Path, role: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        what = "run `make reproduce` first (it writes runs/<profile>/), or give the run folder with --run" \
            if role == "run" else "give the committed results folder with --reference, e.g. results/mini"
        raise FileNotFoundError(f"the {role} folder {path} does not exist{' (a file)' if path.exists() else ''}; "
                                f"{what}")
    return path


def compare_runs(run: Path, reference: Path, *, rtol: float = RTOL, atol: float = ATOL) -> dict[str, Any]:
    """Compare every result table of ``reference`` with the run's: the report as a dict (what ``reproduction.json``
    holds). Raises ``FileNotFoundError`` for a missing folder, ``ValueError`` for a bad tolerance or a table that
    cannot be read."""
    run, reference = _check_folder(run, "run"), _check_folder(reference, "reference")
    if not (math.isfinite(rtol) and rtol >= 0 and math.isfinite(atol) and atol >= 0):
        raise ValueError(f"the tolerances must be finite numbers, 0 or more (got rtol={rtol}, atol={atol})")
    tables: dict[str, Any] = {}
    missing: list[str] = []
    for name in result_tables(reference):
        if not (run / name).is_file():
            missing.append(name)
            continue
        try:
            tables[name] = compare_table(run / name, reference / name, rtol=rtol, atol=atol)
        except (OSError, ValueError, csv.Error) as exc:
            raise ValueError(f"cannot compare {name}: {exc} (run {run / name}, reference {reference / name})") \
                from None
    tot = {"tables_compared": len(tables), "tables_missing": len(missing), "rows_compared": 0,
           "rows_only_reference": 0, "rows_only_run": 0, IDENTICAL: 0, WITHIN: 0, TIMING: 0, DIFFERS: 0,
           "tables_with_column_changes": 0}
    ratios = []
    for t in tables.values():
        tot["rows_compared"] += t["rows_compared"]
        tot["rows_only_reference"] += t["rows_only_reference"]["count"]
        tot["rows_only_run"] += t["rows_only_run"]["count"]
        for c in (IDENTICAL, WITHIN, TIMING, DIFFERS):
            tot[c] += t["cells"][c]
        tot["tables_with_column_changes"] += bool(t["columns_only_reference"] or t["columns_only_run"])
        if t["timing"]["median_ratio"] is not None:
            ratios.append(t["timing"]["median_ratio"])
    tot["timing_median_ratio"] = statistics.median(ratios) if ratios else None
    clean = not (tot[DIFFERS] or tot["rows_only_reference"] or tot["rows_only_run"] or missing
                 or tot["tables_with_column_changes"])
    verdict = ("differs" if not clean else "within tolerance" if tot[WITHIN] else "identical")
    return {"run": str(run), "reference": str(reference), "rtol": rtol, "atol": atol, "verdict": verdict,
            "rule": RULE.format(rtol=rtol, atol=atol), "totals": tot, "tables_missing": missing, "tables": tables}


VERDICTS = {"identical": "every cell identical, timings aside; no row or table missing or extra",
            "within tolerance": "no cell beyond the tolerance, timings aside; no row or table missing or extra",
            "differs": "cells beyond the tolerance, or rows, tables or columns missing or extra: see below"}
RULE = ("identical: same text, or numbers with the same bits; timing (columns named for seconds, time, wall, latency, "
        "tokens_per_s, peak_rss, …): compared only by the ratio run / reference, never a difference; within "
        "tolerance: |run − reference| ≤ max(atol, rtol·max(|run|, |reference|)) with rtol = {rtol:g}, atol = {atol:g} "
        "(summation order depends on the thread count); differs: anything else. Rows are aligned on the table's key: "
        "its identifying columns (not float-valued, not timings) with a usual key name (model, method, variant, M, "
        "budget, state, kind, task, metric, retrained, seed, rank, window), then as few of the others, in column "
        "order, as make the reference's rows unique; JSON tables by the path of each value.")


# --------------------------------------------------------------------------------------------------------- output
def _g(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _cell(v: Any, width: int = 60) -> str:
    s = "(empty)" if _empty(v) else str(v)
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= width else s[:width - 1] + "…"


def render_markdown(rep: Mapping[str, Any]) -> str:
    """The report as markdown: totals and the rule first, then one section per table."""
    tot = rep["totals"]
    lines = [f"# Reproduction: `{rep['run']}` against the reference `{rep['reference']}`", "",
             f"**Verdict: {rep['verdict']}** ({VERDICTS[rep['verdict']]}).", "", "## Totals", "", "| | |", "|---|---:|",
             f"| tables compared | {tot['tables_compared']} |",
             f"| tables of the reference missing in the run | {tot['tables_missing']} |",
             f"| rows compared | {tot['rows_compared']} |",
             f"| cells identical | {tot[IDENTICAL]} |",
             f"| cells within tolerance | {tot[WITHIN]} |",
             f"| timing cells (median ratio run / reference) | {tot[TIMING]} ({_g(tot['timing_median_ratio'])}) |",
             f"| cells that differ | {tot[DIFFERS]} |",
             f"| rows only in the reference | {tot['rows_only_reference']} |",
             f"| rows only in the run | {tot['rows_only_run']} |",
             f"| tables with columns only on one side | {tot['tables_with_column_changes']} |", "",
             f"Rule: {rep['rule']}", ""]
    if rep["tables_missing"]:
        lines += ["Missing in the run: " + ", ".join(f"`{t}`" for t in rep["tables_missing"]), ""]
    lines += ["## Per table", "", "| table | key | rows compared | identical | within tolerance | timings (median "
              "ratio) | differs | only in reference | only in run |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in rep["tables"].items():
        c = t["cells"]
        lines.append(f"| `{name}` | {', '.join(t['key']) or '(row order)'} | {t['rows_compared']} | {c[IDENTICAL]} | "
                     f"{c[WITHIN]} | {c[TIMING]} ({_g(t['timing']['median_ratio'])}) | {c[DIFFERS]} | "
                     f"{t['rows_only_reference']['count']} | {t['rows_only_run']['count']} |")
    lines.append("")
    for name, t in rep["tables"].items():
        notes = []
        if t["cells"][WITHIN]:
            notes.append(f"{t['cells'][WITHIN]} cell(s) within tolerance (largest relative difference "
                         f"{t['max_rel_within']:.3g})")
        if t["timing"]["cells"]:
            cols = ", ".join(f"`{k}` {_g(v)}" for k, v in t["timing"]["columns"].items())
            notes.append(f"timing, ratio {_g(t['timing']['median_ratio'])} (median; "
                         f"{_g(t['timing']['min_ratio'])}–{_g(t['timing']['max_ratio'])}; by column: {cols})")
        for side in ("reference", "run"):
            if t[f"columns_only_{side}"]:
                notes.append(f"columns only in the {side}: " + ", ".join(f"`{x}`" for x in t[f"columns_only_{side}"]))
        d = t["differs"]
        if not (notes or d["cells"] or t["rows_only_reference"]["count"] or t["rows_only_run"]["count"]):
            continue
        lines += [f"### `{name}`", ""] + [f"- {n}" for n in notes]
        if d["cells"]:
            lines.append(f"- differs: {d['cells']} cell(s); by column: " + "; ".join(
                f"`{k}` {v['cells']} (largest abs {_g(v['max_abs'])}, rel {_g(v['max_rel'])})"
                for k, v in d["columns"].items()))
            lines += ["", "| row | column | run | reference | abs | rel |", "|---|---|---|---|---:|---:|"]
            for e in d["examples"][:SHOW]:
                lines.append(f"| {_cell(e['row'], 80)} | `{e['column']}` | {_cell(e['run'])} | "
                             f"{_cell(e['reference'])} | {_g(e['abs'])} | {_g(e['rel'])} |")
            if d["cells"] > SHOW:
                lines.append(f"| … {d['cells'] - SHOW} more in reproduction.json (up to {KEEP}) | | | | | |")
            lines.append("")
        for side, what in (("reference", "rows only in the reference (missing in the run)"),
                           ("run", "rows only in the run (extra)")):
            rows = t[f"rows_only_{side}"]
            if rows["count"]:
                more = f"; … {rows['count'] - SHOW} more" if rows["count"] > SHOW else ""
                lines.append(f"- {what}: {rows['count']}: " + "; ".join(rows["rows"][:SHOW]) + more)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def summary(rep: Mapping[str, Any]) -> str:
    tot = rep["totals"]
    return (f"reproduction {rep['run']} vs {rep['reference']}: {rep['verdict']} — {tot['tables_compared']} tables, "
            f"{tot['rows_compared']} rows: {tot[IDENTICAL]} identical, {tot[WITHIN]} within tolerance, "
            f"{tot[TIMING]} timings (median ratio {_g(tot['timing_median_ratio'])}), {tot[DIFFERS]} differ; "
            f"{tot['rows_only_reference']} row(s) missing, {tot['rows_only_run']} extra, "
            f"{tot['tables_missing']} table(s) missing")


def write_report(rep: Mapping[str, Any], run: Path) -> tuple[Path, Path]:
    """``<run>/reproduction.md`` and ``<run>/reproduction.json``, inside the claimed run folder (recorded in its
    manifest; a folder that is not a cbo results folder is refused)."""
    run = claim_folder(Path(run), "results")
    md = atomic_write_text(run / "reproduction.md", render_markdown(rep))
    js = write_json(run / "reproduction.json", rep)
    return md, js


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the run folder, e.g. runs/mini")
    ap.add_argument("--reference", required=True, help="the reference results folder, e.g. results/mini")
    ap.add_argument("--rtol", type=float, default=RTOL, help="relative tolerance of non-timing numbers "
                                                              "(default %(default)g)")
    ap.add_argument("--atol", type=float, default=ATOL, help="absolute tolerance (default %(default)g)")
    args = ap.parse_args(argv)
    try:
        rep = compare_runs(Path(args.run), Path(args.reference), rtol=args.rtol, atol=args.atol)
        md, _ = write_report(rep, Path(args.run))
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"reproduction: {exc}", file=sys.stderr)
        return 2
    print(summary(rep))
    print(f"report: {md} (and {md.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
