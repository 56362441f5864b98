"""``select_blocks``: the one call from a model to a :class:`~cbo_utils.select.selection.Selection` — any registered
method (default: the package's default CBO variant) on a calibration set given as an object or a spec."""

from __future__ import annotations

from cbo_utils.calibration import CalibrationSet, load_calibration
from cbo_utils.select.methods import method_name, run_method
from cbo_utils.select.selection import Selection


def select_blocks(model, tokenizer, M: int, method: str = "cbo", calibration: CalibrationSet | str = "embedded",
                  samples: int = 32, max_tokens: int = 256, **kw) -> Selection:
    """Choose ``M`` blocks of ``model`` to remove with ``method`` (``cbo`` = the default CBO variant, any CBO variant
    name, or a baseline: ``block_influence``, ``sleb``, ...; see ``cbo_utils.METHODS``). ``calibration`` is a
    :class:`CalibrationSet` or a spec (``embedded``, ``text:PATH``, ``jsonl:PATH``, ``hf:NAME``) read with
    ``samples`` windows of ``max_tokens``. ``kw`` go to the method."""
    name = method_name(method)
    if isinstance(calibration, str):
        calibration = load_calibration(calibration, tokenizer, samples=samples, max_tokens=max_tokens)
    return run_method(name, model, calibration, M, **kw)
