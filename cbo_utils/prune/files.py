"""Block removal from a checkpoint folder without loading the model: safetensors shards rewritten with the kept
layers renumbered, the config's per-layer fields and the quantisation metadata (``quantization_config``,
``hf_quant_config.json``) remapped, the removal recorded — how an FP8 checkpoint follows a selection made on BF16.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cbo_utils.core.artifacts import (
    atomic_folder,
    atomic_write_text,
    parse_blocks,
    provenance,
    read_json,
    write_json,
)
from cbo_utils.model.blocks import ATTENTION, NEMOTRON_NATIVE_TYPES, PATTERN_LETTER, RemovalError, pattern_types
from cbo_utils.prune.export import model_card

_LAYER_NAME = re.compile(r"^((?:[^.]+\.)*?layers)\.(\d+)\.(.+)$")


_LAYER_REF = re.compile(r"(?<![A-Za-z0-9_])layers(\\?\.)(\d+)(?![0-9])")


_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


_INDEX = "model.safetensors.index.json"


_SINGLE = "model.safetensors"


def layout_from_config(config: Mapping[str, Any]) -> tuple[int, list[str], bool]:
    """``(N, block types, hybrid)`` from a ``config.json`` dict (native or remote-code NemotronH, decoder models)."""
    lbt = config.get("layers_block_type")
    if isinstance(lbt, list) and lbt:
        unknown = sorted({t for t in lbt if t not in NEMOTRON_NATIVE_TYPES and t not in PATTERN_LETTER})
        if unknown:
            raise ValueError(f"config.json layers_block_type has unknown layer types {unknown}")
        return len(lbt), [NEMOTRON_NATIVE_TYPES.get(t, t) for t in lbt], True
    pattern = config.get("hybrid_override_pattern")
    if isinstance(pattern, str) and pattern:
        return len(pattern), pattern_types(pattern), True
    n = config.get("num_hidden_layers")
    if isinstance(n, int) and n > 0:
        return n, ["decoder"] * n, False
    raise ValueError("config.json has neither layers_block_type, hybrid_override_pattern nor num_hidden_layers: "
                     "cannot tell how many blocks the checkpoint has (nested text_config checkpoints are not "
                     "supported)")


def _check_remove_list(remove, n: int, types: Sequence[str], hybrid: bool) -> list[int]:
    """Validate a removal set against a checkpoint's layout (the rules of :func:`cbo_utils.model.blocks.check_removal`)."""
    if isinstance(remove, str):
        remove = parse_blocks(remove)
    remove = list(remove)
    bad = [b for b in remove if isinstance(b, bool) or not isinstance(b, (int, np.integer))]
    if bad:
        raise RemovalError(f"block indices must be integers, got {bad!r}")
    remove = [int(b) for b in remove]
    out = sorted({b for b in remove if not 0 <= b < n})
    if out:
        raise RemovalError(f"block indices {out} are out of range: the checkpoint has {n} blocks, numbered 0..{n - 1}")
    dup = sorted({b for b in remove if remove.count(b) > 1})
    if dup:
        raise RemovalError(f"block indices {dup} are listed more than once")
    if not remove:
        raise RemovalError("nothing to remove: give at least one block index")
    if len(remove) >= n:
        raise RemovalError(f"removing all {n} blocks leaves no model; remove at most {n - 1}")
    att = [i for i, t in enumerate(types) if t == ATTENTION]
    if hybrid and att and not set(att) - set(remove):
        raise RemovalError(f"this removal takes out every attention block {att} of a hybrid model; at least one must "
                           "remain (cached generation needs it)")
    return sorted(remove)


def remap_layer_references(obj: Any, kept: Sequence[int], n_original: int, record: dict | None = None) -> Any:
    """A copy of a JSON-like ``obj`` (e.g. a ``quantization_config``) in which every module name that contains
    ``layers.<i>`` (also the regex form ``layers\\.<i>``) refers to the pruned model: names of removed layers are
    dropped (from lists, and dict entries whose key or string value names one), names of kept layers renumbered.
    Strings that mention ``mtp`` (NemotronH's multi-token-prediction layers, numbered separately) and indices
    ≥ ``n_original`` are left unchanged. ``record`` (a dict) collects ``dropped``, ``renamed`` and ``unchanged``."""
    new_of = {old: new for new, old in enumerate(kept)}
    rec = record if record is not None else {}
    for key in ("dropped", "renamed", "unchanged"):
        rec.setdefault(key, [])
    DROP = object()

    def fix(s: str):
        """One string: unchanged, renumbered, or DROP when it names a removed layer."""
        if "mtp" in s.lower():
            if _LAYER_REF.search(s):
                rec["unchanged"].append(s)
            return s
        hits = list(_LAYER_REF.finditer(s))
        if not hits:
            return s
        idx = [int(m.group(2)) for m in hits]
        if any(i >= n_original for i in idx):
            rec["unchanged"].append(s)
            return s
        if any(i not in new_of for i in idx):
            rec["dropped"].append(s)
            return DROP
        new = _LAYER_REF.sub(lambda m: f"layers{m.group(1)}{new_of[int(m.group(2))]}", s)
        if new != s:
            rec["renamed"].append([s, new])
        return new

    def walk(o):
        """Rebuild lists and dicts, dropping entries that name removed layers."""
        if isinstance(o, str):
            return fix(o)
        if isinstance(o, list):
            out = [walk(v) for v in o]
            return [v for v in out if v is not DROP]
        if isinstance(o, dict):
            out = {}
            for k, v in o.items():
                nk = fix(k) if isinstance(k, str) else k
                nv = walk(v)
                if nk is DROP or nv is DROP:
                    continue
                out[nk] = nv
            return out
        return o

    res = walk(obj)
    return None if res is DROP else res


def prune_config_dict(config: Mapping[str, Any], kept: Sequence[int], n_original: int,
                      removed: Sequence[int] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``config.json`` dict of the pruned checkpoint, and a record of what changed.

    Mirrors the in-memory path (:meth:`cbo_utils.model.blocks.Adapter.rewrite_config` and ``config_json_extras``):
    ``layers_block_type`` / ``layer_types`` filtered, ``hybrid_override_pattern`` filtered (and written, with
    ``num_hidden_layers``, for native NemotronH configs, as vLLM reads them), ``num_hidden_layers`` = kept count,
    ``max_window_layers`` recounted, ``mlp_only_layers`` / ``no_rope_layers`` remapped (flag lists filtered, index
    lists renumbered), any other list field whose name contains ``layer`` with one non-integer entry per layer
    filtered, ``quantization_config`` remapped by :func:`remap_layer_references`, and ``cbo_removed_blocks`` extended
    (cumulative, in indices of the first model).
    """

    cfg = json.loads(json.dumps(config))
    kept = list(kept)
    rec: dict[str, Any] = {"fields": []}
    native = isinstance(cfg.get("layers_block_type"), list)
    for name in ("layers_block_type", "layer_types"):
        v = cfg.get(name)
        if isinstance(v, list) and len(v) == n_original:
            cfg[name] = [v[i] for i in kept]
            rec["fields"].append(name)
    pat = cfg.get("hybrid_override_pattern")
    if isinstance(pat, str) and len(pat) == n_original:
        cfg["hybrid_override_pattern"] = "".join(pat[i] for i in kept)
        rec["fields"].append("hybrid_override_pattern")
    elif native:
        cfg["hybrid_override_pattern"] = "".join(PATTERN_LETTER[NEMOTRON_NATIVE_TYPES.get(t, t)]
                                                 for t in cfg["layers_block_type"])
        rec["fields"].append("hybrid_override_pattern (written for vLLM)")
    cfg["num_hidden_layers"] = len(kept)
    rec["fields"].append("num_hidden_layers")
    mwl = cfg.get("max_window_layers")
    if isinstance(mwl, int) and not isinstance(mwl, bool):
        cfg["max_window_layers"] = sum(1 for i in kept if i < mwl)
        rec["fields"].append("max_window_layers")
    new_of = {old: new for new, old in enumerate(kept)}
    for name in ("mlp_only_layers", "no_rope_layers"):
        v = cfg.get(name)
        if not isinstance(v, list) or not v:
            continue
        if len(v) == n_original and n_original > 1 and all(isinstance(x, (bool, int)) and x in (0, 1) for x in v):
            cfg[name] = [v[i] for i in kept]
        else:
            cfg[name] = [new_of[x] for x in v if x in new_of]
        rec["fields"].append(name)
    handled = {"layers_block_type", "layer_types", "mlp_only_layers", "no_rope_layers"}
    for name, v in list(cfg.items()):
        if (name not in handled and "layer" in name.lower() and isinstance(v, list) and len(v) == n_original
                and not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            cfg[name] = [v[i] for i in kept]
            rec["fields"].append(name)
    for name in ("quantization_config", "compression_config"):
        if isinstance(cfg.get(name), dict):
            qrec: dict[str, Any] = {}
            cfg[name] = remap_layer_references(cfg[name], kept, n_original, qrec)
            rec[name] = qrec
    prev = list(cfg.get("cbo_removed_blocks") or [])
    removed = sorted(int(b) for b in removed)
    if prev:
        orig_kept = [i for i in range(n_original + len(prev)) if i not in set(prev)]
        removed = sorted(set(prev) | {orig_kept[i] for i in removed})
    cfg["cbo_removed_blocks"] = removed
    return cfg, rec


def prune_checkpoint_files(src_dir, remove, out_dir, *, overwrite: bool = False, method: str = "manual",
                           energy: float | None = None, source: str | None = None,
                           extra: Mapping[str, Any] | None = None) -> Path:
    """Remove blocks ``remove`` (0-based) from the checkpoint folder ``src_dir`` WITHOUT loading the model, into
    ``out_dir``; returns ``out_dir``.

    - weights: the safetensors file(s) — ``model.safetensors`` or the shards of ``model.safetensors.index.json`` —
      are read one at a time; tensors of removed layers are dropped and the layer index in the names of kept layers
      renumbered (``model.layers.{i}.``, ``backbone.layers.{i}.``, any ``<prefix>.layers.{i}.`` whose indices cover
      exactly 0..N−1; other numbered stacks such as NemotronH's ``mtp.layers`` are left alone). Dtypes (FP8 included)
      and per-shard metadata are kept; the index is rewritten (``total_size``, ``total_parameters``), shards that
      become empty are dropped and the rest renumbered. Pickled weights (``*.bin``) are never read.
    - ``config.json``: :func:`prune_config_dict` (layer pattern fields, ``num_hidden_layers``, per-layer lists, and
      the per-layer module names of ``quantization_config``, e.g. ``ignore`` / ``modules_to_not_convert`` lists, so
      an FP8 checkpoint's quantisation metadata follows the removal); ``hf_quant_config.json`` (ModelOpt) likewise.
    - every other file (tokenizer, chat template, generation config, remote code, licence) is copied; the source
      ``README.md`` is kept as ``SOURCE_README.md`` next to a new model card.
    - ``removed_blocks.json`` (the record :func:`cbo_utils.prune.export.verify_export` reads) holds the removal, what was
      rewritten and the provenance.

    The folder is written under a temporary name and renamed at the end.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file


    src, out_dir = Path(src_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: give a save_pretrained checkpoint folder")
    if out_dir.resolve() == src.resolve():
        raise ValueError("out_dir must differ from src_dir (the source checkpoint is never modified)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another folder or pass overwrite=True")
    config = read_json(src / "config.json")
    n, types, hybrid = layout_from_config(config)
    remove = _check_remove_list(remove, n, types, hybrid)
    kept = [i for i in range(n) if i not in set(remove)]
    new_of = {old: new for new, old in enumerate(kept)}

    if (src / _INDEX).is_file():
        index = read_json(src / _INDEX)
        weight_map: dict[str, str] = index["weight_map"]
        shards = list(dict.fromkeys(sorted(weight_map.values())))
    elif (src / _SINGLE).is_file():
        index, weight_map, shards = None, None, [_SINGLE]
    else:
        found = sorted(p.name for p in src.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        raise FileNotFoundError(f"{src} has no model.safetensors or {_INDEX}" + (
            f" (found {found}: pickled weights are never read; convert them to safetensors first)" if found else ""))

    names_by_shard: dict[str, list[str]] = {}
    for shard in shards:
        with safe_open(str(src / shard), framework="pt") as f:
            names_by_shard[shard] = list(f.keys())
    prefixes: dict[str, set[int]] = {}
    for names in names_by_shard.values():
        for name in names:
            m = _LAYER_NAME.match(name)
            if m:
                prefixes.setdefault(m.group(1), set()).add(int(m.group(2)))
    main_prefixes = [p for p, idx in prefixes.items() if idx == set(range(n))]
    if len(main_prefixes) != 1:
        raise ValueError(f"cannot find the block stack in the tensor names: the config says {n} blocks but the "
                         f"numbered prefixes are { {p: (min(i), max(i), len(i)) for p, i in prefixes.items()} }")
    prefix = main_prefixes[0]

    def rename(name: str) -> str | None:
        """The tensor's name in the pruned checkpoint, or None when its layer is removed."""
        m = _LAYER_NAME.match(name)
        if not m or m.group(1) != prefix:
            return name
        i = int(m.group(2))
        return None if i not in new_of else f"{prefix}.{new_of[i]}.{m.group(3)}"

    new_config, cfg_rec = prune_config_dict(config, kept, n, remove)
    with atomic_folder(out_dir) as tmp:
        written: list[tuple[str, dict[str, str]]] = []  # (temporary shard name, {new tensor name: shard})
        total_size = total_params = 0
        n_dropped = 0
        for j, shard in enumerate(shards):
            tensors, meta = {}, None
            with safe_open(str(src / shard), framework="pt") as f:
                meta = f.metadata()
                for name in names_by_shard[shard]:
                    new = rename(name)
                    if new is None:
                        n_dropped += 1
                        continue
                    t = f.get_tensor(name)
                    tensors[new] = t
                    total_size += t.numel() * t.element_size()
                    total_params += t.numel()
            if tensors:
                part = f".part-{j:05d}.safetensors"
                save_file(tensors, str(tmp / part), metadata=meta)
                written.append((part, {name: part for name in tensors}))
        if index is None:
            os.replace(tmp / written[0][0], tmp / _SINGLE)
            final_shards = [_SINGLE]
        else:
            same = len(written) == len(shards)
            final_shards = []
            new_map: dict[str, str] = {}
            kept_src = [s for s in shards if any(rename(x) is not None for x in names_by_shard[s])]
            for j, (part, names) in enumerate(written):
                final = kept_src[j] if same else f"model-{j + 1:05d}-of-{len(written):05d}.safetensors"
                os.replace(tmp / part, tmp / final)
                final_shards.append(final)
                new_map.update({name: final for name in names})
            meta_idx = dict(index.get("metadata") or {})
            meta_idx["total_size"] = total_size
            if "total_parameters" in meta_idx:
                meta_idx["total_parameters"] = total_params
            write_json(tmp / _INDEX, {"metadata": meta_idx, "weight_map": dict(sorted(new_map.items()))})
        write_json(tmp / "config.json", new_config)
        quant_rec = None
        skipped = []
        for p in sorted(src.iterdir()):
            if p.name in set(shards) | {_INDEX, "config.json", "removed_blocks.json", "verification.json"}:
                continue
            if p.name == "hf_quant_config.json":
                quant_rec = {}
                write_json(tmp / p.name, remap_layer_references(read_json(p), kept, n, quant_rec))
            elif p.suffix in _WEIGHT_SUFFIXES or p.name.endswith(".safetensors"):
                skipped.append(p.name)
            elif p.name == "README.md":
                shutil.copy2(p, tmp / "SOURCE_README.md")
            elif p.is_dir():
                shutil.copytree(p, tmp / p.name)
            else:
                shutil.copy2(p, tmp / p.name)
        record = {
            "removed_blocks": remove, "kept_blocks": kept, "index_base": 0, "num_blocks_original": n,
            "num_blocks_pruned": len(kept), "removed_block_types": [types[i] for i in remove], "method": method,
            "energy": energy, "source_model": source or str(src), "parameters_pruned": total_params,
            "pruned_from_files": True, "tensor_prefix": prefix, "tensors_dropped": n_dropped,
            "shards": final_shards, "config_rewrite": cfg_rec, "hf_quant_config": quant_rec,
            "skipped_files": skipped,
            "provenance": provenance("pruned_checkpoint_files", {"remove": remove, "method": method},
                                     inputs={"config": src / "config.json"}, **dict(extra or {})),
        }
        write_json(tmp / "removed_blocks.json", record)
        atomic_write_text(tmp / "README.md", model_card(record, (config.get("architectures") or ["?"])[0]))
    return out_dir
