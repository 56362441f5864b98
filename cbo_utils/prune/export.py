"""Exporting pruned models as standard ``save_pretrained`` folders, and verifying every export.

An export folder holds what ``from_pretrained`` needs (config, safetensors weights, tokenizer) plus
``removed_blocks.json`` (0-based indices of the original model, method, energy, provenance), a short model card
(``README.md``) and, after :func:`verify_export`, ``verification.json``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from cbo_utils.core.artifacts import (
    atomic_folder,
    atomic_write_text,
    check_output,
    provenance,
    read_json,
    write_json,
)
from cbo_utils.model.blocks import Gates, block_types, check_removal, get_adapter, num_blocks, remove_blocks
from cbo_utils.model.load import model_device


class VerificationError(AssertionError):
    """An exported model failed a check of :func:`verify_export` (the message lists which)."""


def export_pruned(model, tokenizer, remove, out_dir, *, method: str = "manual", energy: float | None = None,
                  source: str | None = None, extra: dict | None = None, overwrite: bool = False,
                  calibration: dict | None = None) -> Path:
    """Remove ``remove`` from ``model`` (in place) and save a standard checkpoint folder at ``out_dir``.

    The folder is written under a temporary name and renamed at the end, so an interrupted export never leaves a
    half-written model behind. Returns the folder.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    adapter = get_adapter(model)
    types_before = block_types(model)
    remove = check_removal(model, remove)
    remove_blocks(model, remove)
    with atomic_folder(out_dir, "pruned_model") as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        extras = adapter.config_json_extras(model.config)
        if extras:  # fields other tools read from config.json (e.g. vLLM: hybrid_override_pattern)
            cfg = read_json(tmp / "config.json")
            cfg.update(extras)
            write_json(tmp / "config.json", cfg)
        record = removal_record(remove, types_before, method=method, energy=energy, source=source,
                                parameters=sum(p.numel() for p in model.parameters()), extra=extra,
                                calibration=calibration, license=source_license(source))
        write_json(tmp / "removed_blocks.json", record)
        write_model_card(tmp)
    return out_dir


def removal_record(remove, types, *, method: str, energy: float | None, source: str | None, parameters: int,
                   kind: str = "pruned_model", inputs: dict | None = None, extra: dict | None = None,
                   **fields: Any) -> dict[str, Any]:
    """The ``removed_blocks.json`` record of a pruned folder (the one schema for exports of models in memory and of
    checkpoint files): the removal in 0-based indices of the source model of block ``types``, what is kept, the
    method and energy, the parameter count after removal, any further ``fields``, and the provenance."""
    remove = sorted(int(b) for b in remove)
    kept = [i for i in range(len(types)) if i not in set(remove)]
    return {
        "removed_blocks": remove, "kept_blocks": kept, "index_base": 0, "num_blocks_original": len(types),
        "num_blocks_pruned": len(kept), "removed_block_types": [types[i] for i in remove], "method": method,
        "energy": energy, "source_model": source, "parameters_pruned": int(parameters), **fields,
        "provenance": provenance(kind, {"remove": remove, "method": method}, inputs=inputs, **(extra or {})),
    }


def source_license(source: str | None) -> str | None:
    """The licence of a source model when it is known: the ``license:`` of a local folder's model card front matter
    (a Hub id is not looked up)."""
    if not source:
        return None
    readme = Path(source) / ("SOURCE_README.md" if (Path(source) / "SOURCE_README.md").is_file() else "README.md")
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    import yaml

    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else None


def _hub_id(source: str | None) -> str | None:
    """``source`` when it reads as a Hub id (``org/name``, not a local path): the card's ``base_model``."""
    if not source or Path(source).exists() or source.count("/") != 1 or source.startswith((".", "/")):
        return None
    return source


def model_card(rec: dict[str, Any], cls: str, verification: dict | None = None,
               evaluation: str | None = None) -> str:
    """The README.md of a pruned folder, from its :func:`removal_record`: YAML front matter the Hugging Face Hub
    renders (``base_model`` for a Hub source, ``library_name``, ``pipeline_tag``, ``tags``, ``license`` when known),
    then the method, removed blocks, energy, calibration recipe, the verification result and an evaluation summary
    (Markdown) when one ran."""
    import yaml

    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["pruned", "block-removal", "cbo", "cbo_utils"]}
    if _hub_id(rec.get("source_model")):
        front = {"base_model": rec["source_model"], **front}
    if rec.get("license"):
        front["license"] = rec["license"]
    energy = "" if rec["energy"] is None else f"\n- Energy of the removal set: `{rec['energy']:.6g}`"
    cal = rec.get("calibration") or {}
    calib = "" if not cal else (f"\n- Calibration: {cal.get('source', '?')}, {cal.get('samples', '?')} samples, "
                                f"{cal.get('tokens', '?')} tokens (SHA-256 `{str(cal.get('sha256', ''))[:12]}`)")
    if verification is None:
        ver = "Not verified yet (`cbo verify FOLDER --original SOURCE`)."
    else:
        checks = verification.get("checks", {})
        failed = [k for k, c in checks.items() if not c.get("ok")]
        diff = checks.get("logits_vs_gated_alpha0", {}).get("max_abs_diff")
        ver = (("**Passed**" if not failed else f"**Failed**: {', '.join(failed)}") + " — reload without missing or "
               "unexpected keys, every layer index and the config depth consistent, logits equal to the source "
               "model with its gates at 0 on the removed blocks" + (f" (max |Δ| {diff:.2g})" if diff is not None
                                                                    else "") + ", cached generation equal to "
               "uncached.")
    body = f"""# Pruned model: {rec['num_blocks_pruned']} of {rec['num_blocks_original']} blocks kept

Made with `cbo_utils` (block removal by constrained binary optimisation, arXiv 2602.00161).

- Source model: `{rec['source_model']}` ({cls})
- Removed blocks (0-based indices of the source model): `{' '.join(map(str, rec['removed_blocks']))}`
- Removed block types: {', '.join(rec['removed_block_types'])}
- Selection method: `{rec['method']}`{energy}{calib}
- Parameters after removal: {rec['parameters_pruned']:,}

## Verification

{ver}
"""
    if evaluation:
        body += f"\n## Evaluation\n\n{evaluation}\n"
    body += ("\nLoad it with plain `AutoModelForCausalLM.from_pretrained(folder)`; `removed_blocks.json` has the full "
             "record. No retraining was applied unless stated here.\n")
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n" + body


def write_model_card(folder, evaluation: str | None = None) -> Path:
    """(Re)write ``folder/README.md`` from its ``removed_blocks.json``, ``verification.json`` (when present) and an
    evaluation summary (kept in ``evaluation.md`` so a later rewrite keeps it)."""
    folder = Path(folder)
    rec = read_json(folder / "removed_blocks.json")
    ver = read_json(folder / "verification.json") if (folder / "verification.json").is_file() else None
    if evaluation is not None:
        atomic_write_text(folder / "evaluation.md", evaluation + "\n")
    elif (folder / "evaluation.md").is_file():
        evaluation = (folder / "evaluation.md").read_text().strip()
    cfg = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    return atomic_write_text(folder / "README.md", model_card(rec, (cfg.get("architectures") or ["?"])[0], ver,
                                                               evaluation))


def read_removal_record(folder) -> dict[str, Any]:
    """``folder/removed_blocks.json`` (the record :func:`export_pruned` writes), checked for its shape: a JSON object
    whose ``removed_blocks`` is a list of distinct 0-based block indices (integers), within ``num_blocks_original``
    of the source model. Anything else raises ``ValueError`` naming the file and what is wrong."""
    path = Path(folder) / "removed_blocks.json"
    try:
        rec = read_json(path)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); export the model again with "
                         "`cbo prune`") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; export the model again with `cbo prune`") from None
    fix = "it is not the record `cbo prune` writes — export the model again with `cbo prune`"
    if not isinstance(rec, dict):
        raise ValueError(f"{path} holds a JSON {type(rec).__name__}, not an object with removed_blocks; {fix}")
    rb = rec.get("removed_blocks")
    if not isinstance(rb, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in rb):
        raise ValueError(f"{path}: removed_blocks = {str(rb)[:60]!s} must be a list of 0-based block indices "
                         f"(whole numbers); {fix}")
    if any(b < 0 for b in rb) or len(set(rb)) != len(rb):
        raise ValueError(f"{path}: removed_blocks {rb} has {'negative' if any(b < 0 for b in rb) else 'repeated'} "
                         f"indices; {fix}")
    n = rec.get("num_blocks_original")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{path}: num_blocks_original = {n!r} must be a whole number above 0 (the source model's "
                         f"block count); {fix}")
    if any(b >= n for b in rb) or len(rb) >= n:
        raise ValueError(f"{path}: removed_blocks {rb} does not fit a model of num_blocks_original = {n} blocks "
                         f"(indices 0..{n - 1}, at least one kept); {fix}")
    return rec


@torch.no_grad()
def verify_export(out_dir, original_model, tokenizer=None, *, prompts: list[str] | None = None,
                  max_new_tokens: int = 12, atol: float = 1e-4, write: bool = True, raise_on_fail: bool = True
                  ) -> dict[str, Any]:
    """Check an exported pruned model against the original.

    1. reload with ``output_loading_info=True``: no missing, unexpected or mismatched keys;
    2. config depth and every ``layer_idx`` consistent (0..N−M−1);
    3. logits equal to the original model with α = 0 on the removed blocks (max |Δ| ≤ ``atol``);
    4. greedy generation with the cache equals generation without it.

    Run in float32 (the original's dtype is used as it is; bf16 cached/uncached generation drifts). Writes
    ``verification.json`` into the folder and raises :class:`VerificationError` when a check fails.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    rec = read_removal_record(out_dir)
    removed = rec["removed_blocks"]
    sharded = bool(getattr(original_model, "hf_device_map", None))  # a big model: shard the reload the same way
    pruned, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True,
                                                        dtype=next(original_model.parameters()).dtype,
                                                        **({"device_map": "auto"} if sharded else {}))
    pruned.eval()
    tok = tokenizer or AutoTokenizer.from_pretrained(out_dir)
    report: dict[str, Any] = {"folder": str(out_dir), "removed_blocks": removed, "checks": {}}
    checks = report["checks"]
    load_problems = {k: list(v) for k, v in info.items() if v}
    checks["reload_keys"] = {"ok": not load_problems, "problems": load_problems}
    nonfinite = [n for n, p in pruned.named_parameters()
                 if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all())]
    checks["weights_finite"] = {"ok": not nonfinite, "nonfinite_tensors": nonfinite[:10]}

    n_expected = rec["num_blocks_original"] - len(removed)
    adapter = get_adapter(pruned)
    idx = [[m.layer_idx for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)]
           for b in adapter.layers(pruned)]
    idx_ok = all(all(v == i for v in vals) for i, vals in enumerate(idx))
    depth_ok = len(adapter.layers(pruned)) == n_expected and num_blocks(pruned) == n_expected
    cfg_json = json.loads((out_dir / "config.json").read_text())
    cfg_depth = cfg_json.get("num_hidden_layers", len(cfg_json.get("layers_block_type", [])) or None)
    checks["depth_and_indices"] = {"ok": idx_ok and depth_ok and cfg_depth == n_expected, "blocks": n_expected,
                                   "config_num_hidden_layers": cfg_depth}

    dev = model_device(original_model)
    if not sharded:
        pruned.to(dev)
    pdev = model_device(pruned)
    prompts = prompts or ["The capital of France is", "Water boils at a temperature of"]
    enc = [torch.tensor([tok(p)["input_ids"]], device=dev) for p in prompts]
    max_diff = 0.0
    with Gates(original_model) as gates, gates.removed(removed):
        for ids in enc:
            ref = original_model(ids).logits.float().cpu()
            got = pruned(ids.to(pdev)).logits.float().cpu()
            max_diff = max(max_diff, (ref - got).abs().max().item())
    checks["logits_vs_gated_alpha0"] = {"ok": max_diff <= atol, "max_abs_diff": max_diff, "atol": atol}

    same = True
    gen = []
    for ids in enc:
        ids = ids.to(pdev)
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        a = pruned.generate(ids, use_cache=True, **kw)
        b = pruned.generate(ids, use_cache=False, **kw)
        same &= a.shape == b.shape and bool((a == b).all())
        gen.append(tok.decode(a[0, ids.shape[1]:]))
    checks["generation_cache_equals_no_cache"] = {"ok": same, "max_new_tokens": max_new_tokens, "samples": gen}
    report["ok"] = all(c["ok"] for c in checks.values())
    if write:
        write_json(out_dir / "verification.json", report)
        write_model_card(out_dir)   # the card states the result
    if raise_on_fail and not report["ok"]:
        failed = [k for k, c in checks.items() if not c["ok"]]
        raise VerificationError(f"export {out_dir} failed the checks {failed}: {json.dumps(checks, default=str)}")
    return report


def save_pruned(model, tokenizer, selection, out_dir, *, verify: bool = True, overwrite: bool = False,
                source: str | None = None) -> Path:
    """Save ``selection`` applied to ``model`` as a standard ``save_pretrained`` folder and (``verify=True``) check it
    against ``model`` (:func:`verify_export`). ``model`` is copied, never changed. Returns the folder."""
    if selection.meta.get("windows"):
        raise ValueError("an SWM selection merges weights: save selection.apply(model) with save_pretrained instead")
    pruned = copy.deepcopy(model)
    out = export_pruned(pruned, tokenizer, selection.removed, out_dir, method=selection.method,
                        energy=selection.energy, source=source, overwrite=overwrite,
                        calibration=selection.calibration)
    del pruned
    if verify:
        verify_export(out, model, tokenizer)
    return out
