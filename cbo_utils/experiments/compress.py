"""``compress``: one call from a model to a verified, smaller model — the user's front door (``cbo compress``).

Steps, each finished step recorded in ``<out>/compress.json`` so that an interrupted run resumes at the first
unfinished one (a rerun with other settings into the same folder is refused; nothing in ``out`` that this command
did not write is ever touched):

1. **select** ``M`` blocks with the package's default CBO variant (or any registered method) on a calibration set —
   :func:`cbo_utils.select.api.select_blocks`, the code the comparison harness runs → ``selection.json``;
2. **prune and verify** → ``model/`` (a standard ``save_pretrained`` folder with ``removed_blocks.json``, a model card
   and ``verification.json``: reload keys, logits = the gated original, cached = uncached generation); for a GGUF
   source with ``gguf=True`` also ``model.gguf`` (the source file pruned without loading, quantisation kept);
3. **retrain** (``retrain_steps`` > 0): knowledge distillation from the dense model on the embedded chat mix →
   ``retrained/``;
4. **measure** the dense and the final model side by side in this process: parameters, held-out perplexity on a
   small built-in text (BoolQ passages, 8 × 256 tokens), prefill and generation tokens/s → ``summary.md``.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch

from cbo_utils.calibration import eval_text, load_calibration
from cbo_utils.core.artifacts import atomic_write_text, claim_folder, read_json, read_manifest, write_json
from cbo_utils.core.tables import markdown_table
from cbo_utils.evaluate.efficiency import tokens_per_second
from cbo_utils.evaluate.perplexity import perplexity, perplexity_windows
from cbo_utils.model.blocks import num_blocks
from cbo_utils.model.load import load_model
from cbo_utils.prune.distill import DistillConfig, distill, kd_data
from cbo_utils.prune.export import save_pruned, write_model_card
from cbo_utils.prune.files import prune_gguf_file
from cbo_utils.select.cbo import CBO_VARIANTS, DEFAULT_VARIANT
from cbo_utils.select.methods import METHODS, method_name, run_method
from cbo_utils.select.selection import Selection

RUN_FILE = "compress.json"
STEPS = ("select", "prune", "gguf", "retrain", "measure")


class CompressError(ValueError):
    """A compress run that cannot start (the message says what to change); raised before any work is done."""


def _check_out(out: Path, params: dict) -> dict:
    """The run record in ``out`` to resume (or a fresh one); refuses, before any work, a folder cbo did not write
    for a compress run (by its manifest, :func:`cbo_utils.core.artifacts.claim_folder`) or one of other settings."""
    try:
        claim_folder(out, "compress", create=False)
    except FileExistsError as exc:
        raise CompressError(str(exc)) from None
    run_file = out / RUN_FILE
    if run_file.is_file() and read_manifest(out) is not None:
        rec = _read_run_file(run_file)
        if rec.get("parameters") != params:
            changed = sorted(k for k in set(params) | set(rec.get("parameters", {}))
                             if params.get(k) != rec.get("parameters", {}).get(k))
            raise CompressError(f"{out} holds a compress run with other settings ({', '.join(changed)}); give "
                                "another --out (nothing was changed)")
        return rec
    return {"parameters": params, "steps": {}}


def _read_run_file(run_file: Path) -> dict:
    """``compress.json`` of an earlier run, checked for the shape this module writes (an object with ``parameters``
    and ``steps`` mappings; each finished step a mapping with its ``seconds``; the select step's ``removed_blocks`` a
    list of block indices): anything else is a :class:`CompressError` naming the file, before any work."""
    import json

    fix = "it is not the record of a cbo compress run (edited or damaged); give another --out (nothing was changed)"
    try:
        rec = read_json(run_file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressError(f"{run_file} is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)}); {fix}") \
            from None
    if not isinstance(rec, dict):
        raise CompressError(f"{run_file} holds a JSON {type(rec).__name__}, not an object; {fix}")
    if not isinstance(rec.get("parameters"), dict) or not isinstance(rec.get("steps", {}), dict):
        raise CompressError(f"{run_file}: 'parameters' and 'steps' must be JSON objects; {fix}")
    rec.setdefault("steps", {})
    for name, step in rec["steps"].items():
        if not isinstance(step, dict) or isinstance(step.get("seconds"), bool) \
                or not isinstance(step.get("seconds"), (int, float)):
            raise CompressError(f"{run_file}: step {name!r} = {str(step)[:60]} is not the record of a finished "
                                f"step (an object with its seconds); {fix}")
    sel = rec["steps"].get("select")
    if sel is not None:
        rb = sel.get("removed_blocks")
        if not isinstance(rb, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in rb):
            raise CompressError(f"{run_file}: the select step's removed_blocks = {str(rb)[:60]} must be a list of "
                                f"0-based block indices; {fix}")
    return rec


def _save(out: Path, rec: dict) -> None:
    claim_folder(out, "compress")   # the folder and its manifest exist before the first file is written
    write_json(out / RUN_FILE, rec)


def _measure(model, windows: torch.Tensor) -> dict[str, Any]:
    ppl = perplexity(model, windows)
    speed = tokens_per_second(model)
    return {"parameters": sum(p.numel() for p in model.parameters()), "blocks": num_blocks(model),
            "perplexity": ppl["perplexity"], **speed}


def compress(model: str, M: int, out, *, method: str = "cbo", calibration: str = "mix", samples: int = 16,
             max_tokens: int = 128, retrain_steps: int = 0, dtype: str = "float32", device_map=None,
             gguf: bool = False, seed: int = 0, progress: bool = True, echo=print) -> dict[str, Any]:
    """Compress ``model`` (a local folder, Hub id, GGUF file, ``smollm2`` or a tiny model name) by removing ``M``
    blocks into ``out`` (see the module docstring); returns the summary (also in ``compress.json`` and
    ``summary.md``). ``gguf``: also write ``<out>/model.gguf`` — the source GGUF file with the same blocks removed,
    its (quantised) tensors copied byte for byte (:func:`cbo_utils.prune.files.prune_gguf_file`); needs a GGUF
    source (writing a GGUF from a transformers folder is llama.cpp's converter's job)."""
    try:
        name = method_name("cbo" if method == "default" else method)
    except ValueError:
        raise CompressError(f"unknown method {method!r}; use cbo (the default CBO variant, {DEFAULT_VARIANT}) or "
                            f"one of {', '.join(sorted(METHODS))}") from None
    if name == "sliding_window_merging":
        raise CompressError("sliding_window_merging merges weights instead of removing blocks; use another method")
    import operator

    counts = {}
    for what, v, low in (("M", M, 1), ("samples", samples, 2), ("max_tokens", max_tokens, 8),
                         ("retrain_steps", retrain_steps, 0)):
        try:   # any integer type (numpy's too), never a float or a bool
            counts[what] = operator.index(v)
        except TypeError:
            counts[what] = None
        if isinstance(v, bool) or counts[what] is None or counts[what] < low:   # numpy bools have no __index__
            raise CompressError(f"{what} must be an integer ≥ {low}, got {v!r}")
    M, samples, max_tokens, retrain_steps = (int(counts[k]) for k in ("M", "samples", "max_tokens", "retrain_steps"))
    is_gguf = str(model).endswith(".gguf")
    if is_gguf and not Path(model).is_file():
        raise CompressError(f"no GGUF file at {model}")
    if gguf and not is_gguf:
        raise CompressError("--gguf writes the pruned source GGUF file: give the model as a .gguf file (to make a "
                            "GGUF from a transformers folder use llama.cpp's convert_hf_to_gguf.py on <out>/model)")
    out = Path(out)
    params = {"model": str(model), "M": M, "method": name, "calibration": calibration, "samples": samples,
              "max_tokens": max_tokens, "retrain_steps": retrain_steps, "dtype": dtype, "seed": seed,
              "gguf": bool(gguf)}
    rec = _check_out(out, params)
    steps = rec["steps"]
    t0 = time.perf_counter()
    dense, tok = load_model(model, dtype=dtype, device_map=device_map)
    dense.eval()
    if M >= num_blocks(dense):
        raise CompressError(f"M = {M} but the model has {num_blocks(dense)} blocks; remove fewer")
    load_s = time.perf_counter() - t0
    if "select" not in steps:
        _save(out, rec)   # the settings are recorded before the first step: an interrupted run resumes here
    sel_file = out / "selection.json"
    if "select" not in steps:
        calib = load_calibration(calibration, tok, samples=samples, max_tokens=max_tokens)
        kw: dict[str, Any] = {"seed": seed} if name == "random" else {}
        if name not in CBO_VARIANTS and "progress" in inspect.signature(METHODS[name]).parameters:
            kw["progress"] = progress   # SLEB, one-shot perplexity: bars over their candidate evaluations
        if name in CBO_VARIANTS:   # the variants that re-rank hold out the last quarter of the windows
            kw = {"cache_dir": out / "cache", "seed": seed, "rerank_samples": max(1, samples // 4),
                  "progress": progress}
        echo(f"[1/4] selecting {M} of {num_blocks(dense)} blocks with {name} on {samples} × {max_tokens} "
             f"calibration tokens ({calibration}) …")
        sel = run_method(name, dense, calib, M, **kw)
        out.mkdir(parents=True, exist_ok=True)
        write_json(sel_file, {"method": sel.method, "M": sel.M, "removed_blocks": sel.removed,
                              "energy": sel.energy, "seconds": sel.seconds, "calibration": sel.calibration})
        steps["select"] = {"seconds": round(time.perf_counter() - t0 - load_s, 2), "removed_blocks": sel.removed}
        _save(out, rec)
    removed = steps["select"]["removed_blocks"]
    sel = Selection(name, M, removed)
    if set(steps) - {"select"} and not (out / "model").is_dir():
        raise CompressError(f"{out / 'model'} is missing although {RUN_FILE} records it; give a new --out")
    if "prune" not in steps:
        t1 = time.perf_counter()
        echo(f"[2/4] removing blocks {removed} and verifying the saved model …")
        save_pruned(dense, tok, sel, out / "model", overwrite=(out / "model").exists(), source=str(model))
        steps["prune"] = {"seconds": round(time.perf_counter() - t1, 2), "folder": str(out / "model")}
        _save(out, rec)
    if gguf and "gguf" not in steps:
        t1 = time.perf_counter()
        rep = prune_gguf_file(model, removed, out / "model.gguf", overwrite=(out / "model.gguf").exists())
        steps["gguf"] = {"seconds": round(time.perf_counter() - t1, 2), "file": rep["out"], "tensors": rep["tensors"]}
        _save(out, rec)
    final = out / "model"
    if retrain_steps:
        if "retrain" not in steps:
            t1 = time.perf_counter()
            echo(f"[3/4] retraining {retrain_steps} steps by knowledge distillation from the dense model …")
            student, _ = load_model(str(out / "model"), dtype=dtype)
            cfg = DistillConfig(lr=1e-4, batch_size=8, micro_batch_size=8, max_steps=retrain_steps,
                                warmup_steps=min(2, retrain_steps - 1), teacher_dtype=dtype, student_dtype=dtype,
                                save_every=max(1, retrain_steps // 3), seed=seed)
            data = kd_data(tok, "embedded", max_length=min(256, max_tokens * 2), packing=True, max_train=512,
                           heldout_max=32, seed=seed)
            res = distill(student, dense, tok, data, cfg, out / "retrained", progress=progress)
            steps["retrain"] = {"seconds": round(time.perf_counter() - t1, 2), "folder": str(out / "retrained"),
                                "heldout_kl_before": res.heldout_kl_before, "heldout_kl_after": res.heldout_kl_after}
            _save(out, rec)
        final = out / "retrained"
    else:
        echo("[3/4] no retraining (--retrain-steps 0)")
    t1 = time.perf_counter()
    echo("[4/4] measuring the dense and the compressed model side by side …")
    windows = perplexity_windows(tok, eval_text("boolq"), seq_len=256, windows=8)
    before = _measure(dense, windows)
    small, _ = load_model(str(final), dtype=dtype)
    after = _measure(small.eval(), windows)
    steps["measure"] = {"seconds": round(time.perf_counter() - t1, 2)}
    summary = {"model": str(model), "method": name, "M": M, "removed_blocks": removed, "folder": str(final),
               "before": before, "after": after,
               "seconds": {k: steps[k]["seconds"] for k in STEPS if k in steps},
               "heldout_text": "BoolQ validation passages, 8 × 256 tokens",
               **({"gguf": steps["gguf"]["file"]} if "gguf" in steps else {})}
    rec["summary"] = summary
    _save(out, rec)
    atomic_write_text(out / "summary.md", summary_markdown(summary) + "\n")
    if (final / "removed_blocks.json").is_file():   # the model card states the measured summary
        write_model_card(final, evaluation=summary_markdown(summary))
    echo(summary_markdown(summary))
    return summary


def summary_markdown(s: dict[str, Any]) -> str:
    """The summary table of a compress run (Markdown)."""
    import pandas as pd

    b, a = s["before"], s["after"]
    rows = [("parameters", f"{b['parameters']:,}", f"{a['parameters']:,}", f"{a['parameters'] / b['parameters']:.3f}"),
            ("blocks", b["blocks"], a["blocks"], f"{a['blocks'] / b['blocks']:.3f}"),
            (f"perplexity ({s['heldout_text']})", f"{b['perplexity']:.2f}", f"{a['perplexity']:.2f}",
             f"{a['perplexity'] / b['perplexity']:.3f}"),
            ("prefill tokens/s", f"{b['prefill_tokens_per_s']:.0f}", f"{a['prefill_tokens_per_s']:.0f}",
             f"{a['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f}"),
            ("generation tokens/s", f"{b['generate_tokens_per_s']:.1f}", f"{a['generate_tokens_per_s']:.1f}",
             f"{a['generate_tokens_per_s'] / b['generate_tokens_per_s']:.2f}")]
    table = markdown_table(pd.DataFrame(rows, columns=["", "before", "after", "ratio"]))
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items())
    return (f"{s['model']} → {s['folder']}: removed {s['M']} blocks {s['removed_blocks']} (0-based) with "
            f"{s['method']}\n\n{table}\n\nTime: {secs}.")


__all__ = ["compress", "CompressError", "summary_markdown", "RUN_FILE"]
