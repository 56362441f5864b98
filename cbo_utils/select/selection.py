"""``Selection``: the blocks a method removes (0-based indices of the original model), with how it got there, and
:meth:`Selection.apply` (the pruned copy); the CSV of selections; checks and metadata every method shares.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cbo_utils.calibration import CalibrationSet
from cbo_utils.core.artifacts import atomic_write_text, format_blocks, write_sidecar
from cbo_utils.model.blocks import merge_windows, model_layers, remove_blocks


# ------------------------------------------------------------------------------------------------- Selection
@dataclass
class Selection:
    """The blocks one baseline removes, with how it got there.

    ``removed``: sorted 0-based indices of the original model. ``order``: the order in which blocks were chosen
    (original indices; greedy methods). ``relative``: iterative BI's indices relative to the shrinking model at each
    step (the paper's Table 2 convention). ``scores``: per-block scores of the first step (None where a block was
    not a candidate). ``seconds``: wall-clock of the selection. ``calibration``: ``CalibrationSet.describe()``.
    ``energy``: the CBO energy of ``removed`` (None for methods without one); ``states``: a CBO variant's table of
    lowest states (:mod:`cbo_utils.solvers.states`), not written by :meth:`to_row`.
    """

    method: str
    M: int
    removed: list[int]
    order: list[int] | None = None
    relative: list[int] | None = None
    scores: list[float | None] | None = None
    seconds: float = 0.0
    calibration: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    energy: float | None = None
    states: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.removed = sorted(int(b) for b in self.removed)

    def apply(self, model):
        """The pruned COPY of ``model`` with this selection's blocks removed (SWM: merged, see
        :func:`cbo_utils.model.blocks.merge_windows`); ``model`` itself is never changed."""
        windows = self.meta.get("windows")
        if isinstance(windows, str):
            windows = json.loads(windows)
        if windows:
            return merge_windows(model, windows, self.removed)
        return remove_blocks(copy.deepcopy(model), self.removed)

    def to_row(self) -> dict[str, Any]:
        """A flat dict for a ``selections.csv`` table (block lists as ``"3 7 12"``, meta keys as ``meta_<key>``)."""
        cal = self.calibration or {}
        row: dict[str, Any] = {
            "method": self.method, "M": self.M, "removed": format_blocks(self.removed),
            "order": _join(self.order), "relative": _join(self.relative), "seconds": round(float(self.seconds), 3),
            "calibration_source": cal.get("source"), "calibration_samples": cal.get("samples"),
            "calibration_tokens": cal.get("tokens"), "calibration_sha256": cal.get("sha256"),
            "scores": "" if self.scores is None else " ".join(
                "nan" if s is None else f"{s:.6g}" for s in self.scores),
        }
        if self.energy is not None:
            row["energy"] = float(self.energy)
        for k, v in self.meta.items():
            row[f"meta_{k}"] = v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(
                v, separators=(",", ":"), default=str)
        return row


def _join(xs) -> str:
    return "" if xs is None else " ".join(str(int(x)) for x in xs)


def write_selections_csv(selections: Sequence[Selection], path, provenance_record: dict | None = None):
    """Atomically write ``[s.to_row() for s in selections]`` as CSV (columns = union, in first-seen order); with a
    provenance record also its sidecar ``<path>.json``."""
    rows = [s.to_row() for s in selections]
    cols = list(OrderedDict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    out = atomic_write_text(path, buf.getvalue())
    if provenance_record is not None:
        write_sidecar(out, provenance_record)
    return out


def describe_calibration(calibration) -> dict:
    if isinstance(calibration, CalibrationSet):
        return calibration.describe()
    samples = list(calibration)
    return {"samples": len(samples), "tokens": int(sum(s["input_ids"].numel() for s in samples))}


def check_M(N: int, M: int) -> int:
    if not isinstance(M, int) or isinstance(M, bool) or M < 1 or M > N - 1:
        raise ValueError(f"M must be an integer between 1 and {N - 1} (the model has {N} blocks), got {M!r}")
    return M


def selection_meta(model, **kw) -> dict[str, Any]:
    _, _, N = model_layers(model)
    return {"model": getattr(model.config, "_name_or_path", None) or type(model).__name__, "N": N, **kw}


def timed(fn: Callable[[], Selection]) -> Selection:
    t0 = time.perf_counter()
    sel = fn()
    sel.seconds = time.perf_counter() - t0
    return sel
