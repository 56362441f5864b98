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

import numpy as np
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


def read_table(path, *, text_columns: Iterable[str] = (), number_columns: Iterable[str] = ()) -> pd.DataFrame:
    """A result CSV (empty frame when missing); ``text_columns`` stay text ("12" stays "12", never 12.0; empty
    cells are ""), ``number_columns`` read empty cells as NaN."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame()
    text_columns, number_columns = list(text_columns), list(number_columns)
    if not text_columns:
        return pd.read_csv(path)
    return pd.read_csv(path, dtype={c: str for c in text_columns}, keep_default_na=False,
                       na_values={c: [""] for c in number_columns})


def _as_bool(v):
    """A boolean cell after CSV round trips ("True", "1", 1.0 → True); missing stays missing."""
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(v).strip().lower() in ("true", "1", "1.0")


def upsert_rows(path, rows: Iterable[Mapping], columns: list[str], key: list[str], *, require_columns: bool = True,
                text_columns: Iterable[str] = (), number_columns: Iterable[str] = (), bool_columns: Iterable[str] = (),
                int_columns: Iterable[str] = (), float_format: str | None = None) -> pd.DataFrame:
    """Add ``rows`` to the CSV at ``path`` (created if missing), replacing rows with the same ``key``; atomic write.

    ``columns`` come first (each row must have them unless ``require_columns`` is false), other columns after in
    the order met. The file is read with :func:`read_table` (``text_columns``, ``number_columns``);
    ``bool_columns`` stay True/False and ``int_columns`` integers (nullable) through the round trips;
    ``float_format`` (e.g. ``"%.17g"``) fixes how floats are written."""
    path = Path(path)
    new = pd.DataFrame([dict(r) for r in rows])
    missing = [c for c in columns if c not in new.columns]
    if missing and require_columns:
        raise ValueError(f"rows for {path.name} lack the columns {missing}")
    old = read_table(path, text_columns=text_columns, number_columns=number_columns)
    extra = [c for c in list(old.columns) + list(new.columns) if c not in columns]
    cols = columns + list(dict.fromkeys(extra))
    both = (pd.concat([old.reindex(columns=cols), new.reindex(columns=cols)], ignore_index=True) if len(old.columns)
            else new.reindex(columns=cols))
    for c in bool_columns:
        if c in both:
            both[c] = both[c].map(_as_bool)
    keyed = both[key].apply(lambda col: col.map(key_text)).agg("|".join, axis=1)
    out = both[~keyed.duplicated(keep="last")].reset_index(drop=True)
    for c in int_columns:
        if c in out:
            out[c] = pd.to_numeric(out[c], errors="coerce").astype("Int64")
    buf = io.StringIO()
    out.to_csv(buf, index=False, float_format=float_format, lineterminator="\n")
    atomic_write_text(path, buf.getvalue())
    return out


def add_selections(results_dir, rows: Iterable[Mapping]) -> pd.DataFrame:
    return upsert_rows(Path(results_dir) / "selections.csv", rows, SELECTION_COLUMNS, SELECTION_KEY)


def add_evaluations(results_dir, rows: Iterable[Mapping]) -> pd.DataFrame:
    return upsert_rows(Path(results_dir) / "evaluations.csv", rows, EVALUATION_COLUMNS, EVALUATION_KEY)


def format_cell(x, digits: int = 4) -> str:
    """A Markdown table cell: ``—`` for missing values, ``digits`` significant digits for floats (``digits − 1``
    from 10⁴ on)."""
    if x is None or (isinstance(x, (float, np.floating)) and math.isnan(x)):
        return "—"
    if isinstance(x, (float, np.floating)):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.{digits - 1}g}"
    return str(x)


def markdown_table(df: pd.DataFrame, fmt=format_cell) -> str:
    """``df`` as a Markdown table, cells through ``fmt``."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])
