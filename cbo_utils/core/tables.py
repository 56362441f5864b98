"""The two tidy result tables every report reads (``results/<profile>/selections.csv`` and ``evaluations.csv``),
their one upsert, and the one DataFrame → Markdown writer.

``selections.csv``: one row per selection — model, method, M, removed_blocks (space-separated 0-based original
indices), energy (if any), selection_seconds, calibration_tokens, seed, plus optional detail columns.
``evaluations.csv``: one row per measurement — model, method, M, state, task, metric, value, stderr, n, limit,
retrained, lm_eval_version (plus split/source where known).

Rows are upserted: a row with the same key replaces the old one, so rerunning a stage never duplicates results.
Writes are atomic. Load them with ``pandas.read_csv``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from cbo_utils.core.artifacts import atomic_write_text

SELECTION_COLUMNS = ["model", "method", "M", "removed_blocks", "energy", "selection_seconds", "calibration_tokens",
                     "seed"]


SELECTION_KEY = ["model", "method", "M", "seed"]


EVALUATION_COLUMNS = ["model", "method", "M", "state", "task", "metric", "value", "stderr", "n", "limit",
                      "retrained", "lm_eval_version"]


EVALUATION_KEY = ["model", "method", "M", "state", "task", "metric", "limit", "retrained"]


def key_text(x) -> str:
    """Canonical text of a key cell: missing → '', 4.0 → '4' (a CSV round trip turns int columns with gaps into
    floats), everything else str()."""
    if x is None or (isinstance(x, float) and x != x):
        return ""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    if isinstance(x, bool):
        return str(x)
    return str(x)


def upsert_rows(path, rows: Iterable[Mapping], columns: list[str], key: list[str]) -> pd.DataFrame:
    """Add ``rows`` to the CSV at ``path`` (created if missing), replacing rows with the same ``key``."""
    path = Path(path)
    new = pd.DataFrame([dict(r) for r in rows])
    missing = [c for c in columns if c not in new.columns]
    if missing:
        raise ValueError(f"rows for {path.name} lack the columns {missing}")
    old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=new.columns)
    extra = [c for c in list(old.columns) + list(new.columns) if c not in columns]
    cols = columns + list(dict.fromkeys(extra))
    both = pd.concat([old.reindex(columns=cols), new.reindex(columns=cols)], ignore_index=True)
    keyed = both[key].apply(lambda col: col.map(key_text)).agg("|".join, axis=1)
    out = both[~keyed.duplicated(keep="last")].reset_index(drop=True)
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())
    return out


def add_selections(results_dir, rows: Iterable[Mapping]) -> pd.DataFrame:
    return upsert_rows(Path(results_dir) / "selections.csv", rows, SELECTION_COLUMNS, SELECTION_KEY)


def add_evaluations(results_dir, rows: Iterable[Mapping]) -> pd.DataFrame:
    return upsert_rows(Path(results_dir) / "evaluations.csv", rows, EVALUATION_COLUMNS, EVALUATION_KEY)


def markdown_table(df: pd.DataFrame) -> str:
    def fmt(x):
        if isinstance(x, float):
            if math.isnan(x):
                return "—"
            return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3g}"
        return str(x)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])



