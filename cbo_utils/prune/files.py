"""Block removal from a checkpoint folder without loading the model: safetensors shards rewritten with the kept
layers renumbered, the config's per-layer fields and the quantisation metadata (``quantization_config``,
``hf_quant_config.json``) remapped, the removal recorded — how an FP8 checkpoint follows a selection made on BF16.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from cbo_utils.core.artifacts import (
    atomic_folder,
    check_output,
    parse_blocks,
    provenance,
    read_json,
    write_json,
    write_sidecar,
)
from cbo_utils.model.blocks import (
    NEMOTRON_NATIVE_TYPES,
    PATTERN_LETTER,
    check_indices,
    cumulative_removed,
    pattern_types,
    remap_layer_fields,
)
from cbo_utils.prune.export import removal_record, source_license, write_model_card

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

    The per-layer fields follow the rule of the in-memory path, :func:`cbo_utils.model.blocks.remap_layer_fields`;
    native NemotronH configs also get ``hybrid_override_pattern`` (vLLM reads it, as ``config_json_extras`` writes
    it in memory); ``quantization_config`` / ``compression_config`` are remapped by :func:`remap_layer_references`,
    and ``cbo_removed_blocks`` is extended (cumulative, in indices of the first model).
    """

    cfg = json.loads(json.dumps(config))
    kept = list(kept)
    changes = remap_layer_fields(cfg, kept, n_original)
    cfg.update(changes)
    rec: dict[str, Any] = {"fields": list(changes)}
    if isinstance(cfg.get("layers_block_type"), list) and "hybrid_override_pattern" not in changes:
        cfg["hybrid_override_pattern"] = "".join(PATTERN_LETTER[NEMOTRON_NATIVE_TYPES.get(t, t)]
                                                 for t in cfg["layers_block_type"])
        rec["fields"].append("hybrid_override_pattern (written for vLLM)")
    for name in ("quantization_config", "compression_config"):
        if isinstance(cfg.get(name), dict):
            qrec: dict[str, Any] = {}
            cfg[name] = remap_layer_references(cfg[name], kept, n_original, qrec)
            rec[name] = qrec
    cfg["cbo_removed_blocks"] = cumulative_removed(cfg.get("cbo_removed_blocks"), removed, n_original)
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
    - ``removed_blocks.json`` (the record :func:`cbo_utils.prune.export.verify_export` reads) holds the removal, what
      was rewritten and the provenance.

    The folder is written under a temporary name and renamed at the end.
    """
    src, out_dir = Path(src_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: give a save_pretrained checkpoint folder")
    if out_dir.resolve() == src.resolve():
        raise ValueError("out_dir must differ from src_dir (the source checkpoint is never modified)")
    check_output(out_dir, overwrite)
    config = read_json(src / "config.json")
    n, types, hybrid = layout_from_config(config)
    remove = check_indices(parse_blocks(remove) if isinstance(remove, str) else remove, n, types, hybrid,
                           what="the checkpoint")
    kept = [i for i in range(n) if i not in set(remove)]
    index, shards = _source_shards(src)
    names_by_shard, prefix = _block_stack(src, shards, n)
    rename = _renamer(prefix, kept)
    new_config, cfg_rec = prune_config_dict(config, kept, n, remove)
    with atomic_folder(out_dir) as tmp:
        written = _write_shards(src, tmp, shards, names_by_shard, rename, index)
        write_json(tmp / "config.json", new_config)
        quant_rec, skipped = _copy_other_files(src, tmp, set(shards), kept, n)
        record = removal_record(
            remove, types, method=method, energy=energy, source=source or str(src),
            parameters=written["parameters"], kind="pruned_checkpoint_files", inputs={"config": src / "config.json"},
            extra=extra, pruned_from_files=True, tensor_prefix=prefix, tensors_dropped=written["dropped"],
            shards=written["shards"], config_rewrite=cfg_rec, hf_quant_config=quant_rec, skipped_files=skipped,
            license=source_license(str(src)))
        write_json(tmp / "removed_blocks.json", record)
        write_model_card(tmp)
    return out_dir


def _source_shards(src: Path) -> tuple[dict | None, list[str]]:
    """The safetensors index (None for a single file) and the shard file names of a checkpoint folder."""
    if (src / _INDEX).is_file():
        index = read_json(src / _INDEX)
        return index, list(dict.fromkeys(sorted(index["weight_map"].values())))
    if (src / _SINGLE).is_file():
        return None, [_SINGLE]
    found = sorted(p.name for p in src.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    raise FileNotFoundError(f"{src} has no model.safetensors or {_INDEX}" + (
        f" (found {found}: pickled weights are never read; convert them to safetensors first)" if found else ""))


def _block_stack(src: Path, shards: Sequence[str], n: int) -> tuple[dict[str, list[str]], str]:
    """The tensor names of every shard, and the prefix of the block stack: the one ``<prefix>.layers`` whose
    indices are exactly 0..n−1 (other numbered stacks such as NemotronH's ``mtp.layers`` are not it)."""
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
    return names_by_shard, main_prefixes[0]


def _renamer(prefix: str, kept: Sequence[int]):
    """``name → name in the pruned checkpoint`` (None when its layer is removed; other tensors unchanged)."""
    new_of = {old: new for new, old in enumerate(kept)}

    def rename(name: str) -> str | None:
        m = _LAYER_NAME.match(name)
        if not m or m.group(1) != prefix:
            return name
        i = int(m.group(2))
        return None if i not in new_of else f"{prefix}.{new_of[i]}.{m.group(3)}"

    return rename


def _write_shards(src: Path, tmp: Path, shards: Sequence[str], names_by_shard: Mapping[str, list[str]], rename,
                  index: dict | None) -> dict[str, Any]:
    """Write the kept tensors, renamed, shard by shard into ``tmp`` (dtypes and per-shard metadata kept; shards that
    become empty dropped and the rest renumbered; the index rewritten). Returns the shard names, the parameter
    count and the number of tensors dropped."""
    written: list[tuple[str, list[str]]] = []  # (temporary shard name, its new tensor names)
    total_size = total_params = n_dropped = 0
    for j, shard in enumerate(shards):
        tensors = {}
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
            written.append((part, list(tensors)))
    if index is None:
        os.replace(tmp / written[0][0], tmp / _SINGLE)
        return {"shards": [_SINGLE], "parameters": total_params, "dropped": n_dropped}
    same = len(written) == len(shards)
    kept_src = [s for s in shards if any(rename(x) is not None for x in names_by_shard[s])]
    final_shards, new_map = [], {}
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
    return {"shards": final_shards, "parameters": total_params, "dropped": n_dropped}


def _copy_other_files(src: Path, tmp: Path, shards: set[str], kept: Sequence[int], n: int
                      ) -> tuple[dict | None, list[str]]:
    """Copy every non-weight file (``hf_quant_config.json`` remapped, the source README kept as
    ``SOURCE_README.md``); returns the quantisation record and the weight files skipped (never read)."""
    quant_rec, skipped = None, []
    for p in sorted(src.iterdir()):
        if p.name in shards | {_INDEX, "config.json", "removed_blocks.json", "verification.json"}:
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
    return quant_rec, skipped


# ------------------------------------------------------------------------------------------------------- GGUF
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_layout(path) -> dict[str, Any]:
    """The architecture, block count and tensor count of a GGUF file (metadata only)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    return {"architecture": arch, "block_count": int(r.fields[f"{arch}.block_count"].contents()),
            "tensors": len(r.tensors), "fields": len(r.fields)}


def prune_gguf_file(src, remove, out, *, overwrite: bool = False) -> dict[str, Any]:
    """Remove blocks ``remove`` (0-based) from the GGUF file ``src`` WITHOUT loading the model, into ``out``.

    The ``blk.<i>.*`` tensors of removed blocks are dropped and the rest renumbered (also the tensors of blocks
    beyond ``block_count``, e.g. multi-token-prediction layers, shifted down); ``<arch>.block_count`` is rewritten,
    every per-layer metadata array of ``<arch>.*`` (length = block count) filtered, ``leading_dense_block_count``
    recounted; every other field is copied with its type; tensor data (quantised or not) is copied byte for byte.
    Written atomically (a temporary sibling renamed at the end). Returns what was done."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"no GGUF file at {src}")
    check_output(out, overwrite)
    if out.resolve() == src.resolve():
        raise ValueError("the output must be a new file, not the source GGUF")
    r = GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    n = int(r.fields[f"{arch}.block_count"].contents())
    remove = check_indices(remove, n, ["decoder"] * n, False, what=f"{src.name}")
    kept = [i for i in range(n) if i not in set(remove)]
    new_index = {old: new for new, old in enumerate(kept)}
    rewritten = [f"{arch}.block_count"]
    w = GGUFWriter(None, arch=arch, endianess=r.endianess)
    if "general.alignment" in r.fields:
        w.data_alignment = int(r.fields["general.alignment"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        val = f.contents()
        sub = f.types[1] if vtype == GGUFValueType.ARRAY and len(f.types) > 1 else None
        if key == f"{arch}.block_count":
            val = len(kept)
        elif key == f"{arch}.leading_dense_block_count":
            val = sum(1 for i in kept if i < int(val))
            rewritten.append(key)
        elif key.startswith(f"{arch}.") and vtype == GGUFValueType.ARRAY and len(val) == n:
            val = [val[i] for i in kept]
            rewritten.append(key)
        w.add_key_value(key, val, vtype, sub_type=sub)
    tensors = []
    for t in r.tensors:
        m = _GGUF_BLOCK.match(t.name)
        if m:
            i = int(m.group(1))
            if i in set(remove):
                continue
            name = f"blk.{new_index[i] if i < n else i - len(remove)}.{m.group(2)}"
        else:
            name = t.name
        tensors.append((name, t))
        w.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, t in tensors:
            w.write_tensor_data(t.data)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    rep = {"source": str(src), "out": str(out), "architecture": arch, "removed_blocks": remove,
           "block_count": [n, len(kept)], "tensors": [len(r.tensors), len(tensors)], "fields_rewritten": rewritten}
    write_sidecar(out, provenance("pruned_gguf", {"remove": remove}, **rep))   # marks the file as cbo's own
    return rep
