"""Block removal from a checkpoint folder without loading the model: safetensors shards rewritten with the kept
layers renumbered, the config's per-layer fields and the quantisation metadata (``quantization_config``,
``hf_quant_config.json``) remapped, the removal recorded — how an FP8 checkpoint follows a selection made on BF16.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from cbo_utils.core import tempfiles
from cbo_utils.core.artifacts import (
    atomic_folder,
    check_output,
    check_replaceable,
    owning_folder,
    parse_blocks,
    provenance,
    read_json,
    record_files,
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
from cbo_utils.model.load import read_gguf
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
    - every other file (tokenizer, chat template, generation config, remote code, licence, sub-folders) is copied as
      a regular file; the source ``README.md`` is kept as ``SOURCE_README.md`` next to a new model card. Weight
      files that are not the checkpoint's (``*.bin``, ``*.pth``, ``*.gguf``, stray ``*.safetensors``, also in
      sub-folders such as ``original/``) and the ``.git`` / ``.cache`` folders are skipped and listed.
    - ``removed_blocks.json`` (the record :func:`cbo_utils.prune.export.verify_export` reads) holds the removal, what
      was rewritten and the provenance.

    Before anything is written: nothing is read from outside the checkpoint's own storage (:func:`storage_root` —
    the folder, or its Hugging Face cache repository): a symlink that leads out of it, a link loop, a broken link
    or a FIFO / device is refused (``ValueError`` naming it), so the output never receives a file from elsewhere;
    every shard the index names must exist, hold the tensors the index lists and be as long as its header declares;
    and every block must have the tensors the other blocks of its type have (else the pruned model would be loaded
    with randomly initialised weights). The folder is written under a temporary name and renamed at the end.
    """
    src, out_dir = Path(src_dir), Path(out_dir)
    if not os.path.lexists(src / "config.json"):
        raise FileNotFoundError(f"{src} has no config.json: give a save_pretrained checkpoint folder")
    if out_dir.resolve() == src.resolve():
        raise ValueError("out_dir must differ from src_dir (the source checkpoint is never modified)")
    check_output(out_dir, overwrite)
    root = storage_root(src)
    _check_apart(src, root, out_dir)
    files, skipped_dirs = _inventory(src, root)
    if "config.json" not in files:
        raise ValueError(f"{src / 'config.json'} is not a regular file: give a save_pretrained checkpoint folder")
    config = _read_json_file(files["config.json"], src / "config.json")
    n, types, hybrid = layout_from_config(config)
    remove = check_indices(parse_blocks(remove) if isinstance(remove, str) else remove, n, types, hybrid,
                           what="the checkpoint")
    kept = [i for i in range(n) if i not in set(remove)]
    index, shards = _source_shards(src, files)
    names_by_shard, prefix = _block_stack(src, files, shards, n, index)
    _check_blocks_complete(src, names_by_shard, prefix, types)
    rename = _renamer(prefix, kept)
    new_config, cfg_rec = prune_config_dict(config, kept, n, remove)
    with atomic_folder(out_dir, "pruned_model") as tmp:
        written = _write_shards(files, tmp, shards, names_by_shard, rename, index)
        write_json(tmp / "config.json", new_config)
        quant_rec, skipped = _copy_other_files(files, tmp, set(shards), kept, n)
        record = removal_record(
            remove, types, method=method, energy=energy, source=source or str(src),
            parameters=written["parameters"], kind="pruned_checkpoint_files", inputs={"config": src / "config.json"},
            extra=extra, pruned_from_files=True, tensor_prefix=prefix, tensors_dropped=written["dropped"],
            shards=written["shards"], config_rewrite=cfg_rec, hf_quant_config=quant_rec,
            skipped_files=skipped_dirs + skipped, license=source_license(str(src)))
        write_json(tmp / "removed_blocks.json", record)
        write_model_card(tmp)
    return out_dir


# ---------------------------------------------------------------------------------------- containment
#: folders of a checkpoint directory that are never part of the model (git data with every revision's weights,
#: huggingface_hub's ``--local-dir`` download metadata): skipped, not read
_SKIP_DIRS = (".git", ".cache")

_MAX_LINK_HOPS = 40


def storage_root(src) -> Path:
    """The model's own storage, the only place files of the checkpoint folder ``src`` may come from: ``src``
    itself (resolved), or — in the Hugging Face cache layout ``<cache>/models--org--name/snapshots/<rev>/…``, whose
    files are relative links into ``../../blobs/`` — the repository folder ``models--org--name``."""
    real = Path(src).resolve()
    for folder in (real, *real.parents):
        repo = folder.parent.parent
        if folder.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
            return repo
    return real


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _outside_message(link: Path, target: str, where: Path, root: Path) -> str:
    return (f"{link} is a symlink to {target} (resolving to {where}), outside the model's own storage {root}: "
            "cbo never reads files from outside the checkpoint (they would end up in the output) — copy what it "
            "points to into the folder, or remove the link, and rerun")


def _follow_link(link: Path, shown: Path, root: Path) -> Path:
    """The real path the symlink ``link`` (named ``shown`` in messages) leads to, followed one hop at a time:
    refused (``ValueError``) when a hop or its end lies outside ``root`` or it loops; ``FileNotFoundError`` when
    it is broken."""
    cur, first = link, os.readlink(link)
    for _ in range(_MAX_LINK_HOPS):
        if not cur.is_symlink():
            break
        target = os.readlink(cur)
        head, tail = os.path.split(target)
        base = Path(os.path.realpath(os.path.join(os.path.realpath(cur.parent), head or ".")))
        cur = Path(os.path.realpath(base / tail)) if tail in ("", ".", "..") else base / tail
        if not _inside(cur, root):
            raise ValueError(_outside_message(shown, first, cur, root))
    else:
        raise ValueError(f"{shown} is a symlink loop (more than {_MAX_LINK_HOPS} links): remove or fix the link")
    real = Path(os.path.realpath(link))
    if not _inside(real, root):
        raise ValueError(_outside_message(shown, first, real, root))
    if not os.path.exists(real):
        raise FileNotFoundError(f"{shown} is a broken symlink (to {first}): the file it points to is missing — "
                                "download or copy the checkpoint again")
    return real


def _inventory(src: Path, root: Path) -> tuple[dict[str, Path], list[str]]:
    """Every regular file of the checkpoint folder ``src``, as ``{path relative to src (POSIX): the real file to
    read}``, and the folders skipped (:data:`_SKIP_DIRS`). Each symlink is checked (:func:`_follow_link`); linked
    folders inside the storage are walked unless they loop back onto a folder being walked; FIFOs, sockets and
    devices are refused (reading one could block or read from elsewhere). Nothing is opened."""
    files: dict[str, Path] = {}
    skipped: list[str] = []

    def walk(real_dir: Path, rel: str, ancestors: frozenset[Path]) -> None:
        for name in sorted(os.listdir(real_dir)):
            rel_name = f"{rel}{name}"
            path, shown = real_dir / name, src / rel_name
            if not rel and name in _SKIP_DIRS:
                skipped.append(f"{name}/")
                continue
            real = _follow_link(path, shown, root) if path.is_symlink() else path
            mode = os.stat(real).st_mode
            if stat.S_ISDIR(mode):
                if real in ancestors:
                    raise ValueError(f"{shown} links back to a folder that contains it ({real}): copying it would "
                                     "never end — remove the link")
                walk(real, f"{rel_name}/", ancestors | {real})
            elif stat.S_ISREG(mode):
                files[rel_name] = real
            else:
                raise ValueError(f"{shown} is not a regular file or folder (a FIFO, socket or device): a checkpoint "
                                 "holds only files — remove it and rerun")

    start = src.resolve()
    walk(start, "", frozenset({start}))
    return files, skipped


def _check_apart(src: Path, root: Path, out: Path) -> None:
    """The output must lie outside the source's storage, and must not contain the source (``--overwrite`` would
    delete it)."""
    o = out.resolve()
    if _inside(o, root):
        raise ValueError(f"--out {out} lies inside the source checkpoint's storage {root}: write the pruned "
                         "checkpoint to a folder outside it (the source is never modified)")
    if _inside(src.resolve(), o):
        raise ValueError(f"--out {out} contains the source checkpoint {src}: give an --out that is not one of its "
                         "parent folders")


def _read_json_file(real: Path, shown: Path) -> Any:
    try:
        return read_json(real)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{shown} is not valid JSON ({str(exc).splitlines()[0]}): the file is damaged — download "
                         "or save the checkpoint again") from exc


# --------------------------------------------------------------------------------- what the files declare
#: bits per element of the safetensors dtypes (unknown dtypes: the byte range is not checked against the shape)
_ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
            "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
            "F6_E2M3": 6, "F6_E3M2": 6}

_ST_MAX_HEADER = 100_000_000   # the limit of the safetensors library


def check_safetensors_file(real, shown=None) -> dict[str, Any]:
    """The header of the safetensors file ``real`` (named ``shown`` in messages), checked against the file: a
    JSON header whose every tensor has a byte range that matches its dtype and shape and lies inside the file.
    A file shorter than its header declares (truncated) or one that is not safetensors: ``ValueError``."""
    real = Path(real)
    shown = shown or real
    size = real.stat().st_size
    redo = "copy or download it again"
    with open(real, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{shown} is truncated or not a safetensors file ({size} bytes) — {redo}")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _ST_MAX_HEADER:
            raise ValueError(f"{shown} is not a safetensors file (its first 8 bytes declare a {hlen}-byte header) "
                             f"— {redo}")
        if 8 + hlen > size:
            raise ValueError(f"{shown} is truncated: its header is {hlen} bytes but the file has {size} — {redo}")
        raw = fh.read(hlen)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{shown} is not a safetensors file (its header is not a JSON object) — {redo}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            ok = isinstance(b, int) and isinstance(e, int) and 0 <= b <= e and all(d >= 0 for d in shape)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{shown}: the header entry of tensor {name!r} is malformed — {redo}")
        bits = _ST_BITS.get(dtype)
        if bits is not None and math.prod(shape) * bits != 8 * (e - b):
            raise ValueError(f"{shown}: tensor {name} is declared {dtype} {shape} ({math.prod(shape) * bits // 8} "
                             f"bytes) with a data range of {e - b} bytes: the file is damaged — {redo}")
        end = max(end, e)
    if 8 + hlen + end > size:
        raise ValueError(f"{shown} is truncated: its header declares {8 + hlen + end} bytes but the file has "
                         f"{size} — {redo}")
    return header


def _source_shards(src: Path, files: Mapping[str, Path]) -> tuple[dict | None, list[str]]:
    """The safetensors index (None for a single file) and the shard file names of a checkpoint folder; every
    shard the index names must be a ``.safetensors`` file present in the folder."""
    if _INDEX in files:
        index = _read_json_file(files[_INDEX], src / _INDEX)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise ValueError(f"{src / _INDEX} has no weight_map (tensor name → shard file): the index is damaged — "
                             "download or save the checkpoint again")
        shards = list(dict.fromkeys(sorted(wm.values())))
        for shard in shards:
            parts = Path(shard).parts
            if Path(shard).is_absolute() or ".." in parts or not shard.endswith(".safetensors"):
                raise ValueError(f"{src / _INDEX} names the shard {shard!r}, not a .safetensors file inside the "
                                 "checkpoint folder: the index is damaged — download or save the checkpoint again")
            if shard not in files:
                count = sum(1 for v in wm.values() if v == shard)
                raise FileNotFoundError(f"{src / shard} is missing: {_INDEX} lists {count} tensors in it — download "
                                        "or copy the whole checkpoint again")
        return index, shards
    if _SINGLE in files:
        return None, [_SINGLE]
    found = sorted(k for k in files if "/" not in k and Path(k).suffix in _WEIGHT_SUFFIXES)
    raise FileNotFoundError(f"{src} has no model.safetensors or {_INDEX}" + (
        f" (found {found}: pickled weights are never read; convert them to safetensors first)" if found else ""))


def _block_stack(src: Path, files: Mapping[str, Path], shards: Sequence[str], n: int, index: dict | None
                 ) -> tuple[dict[str, list[str]], str]:
    """The tensor names of every shard (each shard checked against its header first, and against the index), and
    the prefix of the block stack: the one ``<prefix>.layers`` whose indices are exactly 0..n−1 (other numbered
    stacks such as NemotronH's ``mtp.layers`` are not it)."""
    from safetensors import SafetensorError

    names_by_shard: dict[str, list[str]] = {}
    home: dict[str, str] = {}
    for shard in shards:
        check_safetensors_file(files[shard], src / shard)
        try:
            with safe_open(str(files[shard]), framework="pt") as f:
                names_by_shard[shard] = list(f.keys())
        except SafetensorError as exc:
            raise ValueError(f"{src / shard} cannot be read as safetensors ({str(exc).splitlines()[0]}) — copy or "
                             "download it again") from exc
        for name in names_by_shard[shard]:
            if name in home:
                raise ValueError(f"tensor {name} is in both {home[name]} and {shard} of {src}: shards of different "
                                 "checkpoints are mixed — download or save the checkpoint again")
            home[name] = shard
    if index is not None:
        missing = [(name, shard) for name, shard in index["weight_map"].items()
                   if name not in home or home[name] != shard]
        if missing:
            name, shard = missing[0]
            raise ValueError(f"{src / shard} lacks {len(missing)} tensor(s) that {_INDEX} lists in it (e.g. {name}): "
                             "the shards and the index are from different downloads or damaged — download or copy "
                             "the checkpoint again")
    prefixes: dict[str, set[int]] = {}
    for names in names_by_shard.values():
        for name in names:
            m = _LAYER_NAME.match(name)
            if m:
                prefixes.setdefault(m.group(1), set()).add(int(m.group(2)))
    main_prefixes = [p for p, idx in prefixes.items() if idx == set(range(n))]
    if len(main_prefixes) != 1:
        gappy = [p for p, idx in prefixes.items() if idx < set(range(n)) and 2 * len(idx) >= n]
        if len(gappy) == 1:
            lost = sorted(set(range(n)) - prefixes[gappy[0]])
            raise ValueError(f"config.json of {src} says {n} blocks but there are no {gappy[0]}.<i>.* tensors for "
                             f"block(s) {_ranges(lost)}: the checkpoint is incomplete — download or save it again")
        raise ValueError(f"cannot find the block stack in the tensor names: the config says {n} blocks but the "
                         f"numbered prefixes are { {p: (min(i), max(i), len(i)) for p, i in prefixes.items()} }")
    return names_by_shard, main_prefixes[0]


def _ranges(idx: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2, 5, 7-8"``."""
    out: list[list[int]] = []
    for i in sorted(idx):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


#: leaf names that carry a module's weight: ``weight``, or the packed tensor of a quantised one (GPTQ / AWQ
#: ``qweight``, compressed-tensors ``weight_packed``) — the module is present when one of them is
_PRIMARY_LEAVES = {"weight", "qweight", "weight_packed"}

#: leaf names of quantisation companions (``weight_scale``, ``input_scale``, ``scales``, ``qzeros``, ``g_idx``,
#: ``SCB``, ``weight_shape``, KV-cache ``k_scale`` …): present or not per layer depending on the recipe (a layer
#: left unquantised has none), so they are not compared
_COMPANION = re.compile(r"weight|scale|zero|g_idx|absmax|quant|scb|packed|shape|format", re.IGNORECASE)


def _block_key(rest: str) -> str | None:
    """What must be present in every block alike, for the tensor ``<prefix>.<i>.<rest>``: the module path for a
    weight (``self_attn.q_proj`` for ``…q_proj.weight``, also for GPTQ's ``…q_proj.qweight``); None for a
    quantisation companion (``…q_proj.weight_scale``, bitsandbytes' ``…q_proj.weight.absmax``, ``self_attn.k_scale``);
    the full name otherwise (``….bias``, ``mixer.A_log``, fused ``mlp.experts.gate_up_proj``)."""
    parts = rest.split(".")
    leaf = parts[-1]
    if "weight" in parts[:-1]:
        return None
    if leaf in _PRIMARY_LEAVES and len(parts) > 1:
        return ".".join(parts[:-1])
    if leaf != "bias" and _COMPANION.search(leaf):
        return None
    return rest


def _check_blocks_complete(src: Path, names_by_shard: Mapping[str, list[str]], prefix: str,
                           types: Sequence[str]) -> None:
    """Refuse a checkpoint in which a block lacks tensors that other blocks of its type have (transformers would
    fill the missing weights of the pruned model with random values, saying so only in a log line).

    The blocks are compared by their modules and parameters (:func:`_block_key`): block ``b`` lacks what block
    ``c`` has when ``b``'s set is a strict subset of ``c``'s, or when, within a top-level module both have (e.g.
    ``self_attn``, ``mlp``), ``b``'s part is a strict subset of ``c``'s. Blocks that differ both ways — a dense and
    the MoE layers of one model, linear and full attention, an unquantised layer among FP8 ones — are the model's
    design and are accepted."""
    n = len(types)
    keys: list[dict[str, list[str]]] = [{} for _ in range(n)]
    for names in names_by_shard.values():
        for name in names:
            m = _LAYER_NAME.match(name)
            if m and m.group(1) == prefix:
                key = _block_key(m.group(3))
                if key is not None:
                    keys[int(m.group(2))].setdefault(key, []).append(m.group(3))
    groups: dict[tuple[str, frozenset], list[int]] = {}
    for i in range(n):
        groups.setdefault((types[i], frozenset(keys[i])), []).append(i)
    ordered = sorted(groups.items(), key=lambda g: -len(g[1]))   # the commonest layout first: the reference

    def parts(sig: frozenset) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for k in sig:
            out.setdefault(k.split(".", 1)[0], set()).add(k)
        return out

    for (kind, sig), blocks in ordered:
        for (other_kind, other), peers in ordered:
            if other_kind != kind or other == sig:
                continue
            if sig < other:
                lost = other - sig
            else:
                mine, theirs = parts(sig), parts(other)
                lost = set().union(*(theirs[c] - mine[c] for c in mine.keys() & theirs.keys()
                                     if mine[c] < theirs[c]))
            if not lost:
                continue
            names = [f"{prefix}.{blocks[0]}.{r}" for key in sorted(lost) for r in keys[peers[0]][key]]
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            which = f"block {blocks[0]} lacks" if len(blocks) == 1 else f"blocks {_ranges(blocks)} lack"
            raise ValueError(f"{src}: {which} tensors that {len(peers)} other {kind} block(s) have ({shown}): "
                             "pruning would give a model that transformers fills with random weights — the "
                             "checkpoint is incomplete or damaged; download or save it again")


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


def _write_shards(files: Mapping[str, Path], tmp: Path, shards: Sequence[str],
                  names_by_shard: Mapping[str, list[str]], rename, index: dict | None) -> dict[str, Any]:
    """Write the kept tensors, renamed, shard by shard into ``tmp`` (dtypes and per-shard metadata kept; shards that
    become empty dropped and the rest renumbered; the index rewritten). Returns the shard names, the parameter
    count and the number of tensors dropped."""
    written: list[tuple[str, list[str]]] = []  # (temporary shard name, its new tensor names)
    total_size = total_params = n_dropped = 0
    for j, shard in enumerate(shards):
        tensors = {}
        with safe_open(str(files[shard]), framework="pt") as f:
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


def _copy_other_files(files: Mapping[str, Path], tmp: Path, shards: set[str], kept: Sequence[int], n: int
                      ) -> tuple[dict | None, list[str]]:
    """Copy every non-weight file of the inventory (:func:`_inventory`) as a regular file (``hf_quant_config.json``
    remapped, the source README kept as ``SOURCE_README.md``); returns the quantisation record and the weight files
    skipped (never read), also those in sub-folders."""
    quant_rec, skipped = None, []
    for rel, real in sorted(files.items()):
        if rel in shards | {_INDEX, "config.json", "removed_blocks.json", "verification.json"}:
            continue
        name = rel.rsplit("/", 1)[-1]
        if rel == "hf_quant_config.json":
            quant_rec = {}
            write_json(tmp / rel, remap_layer_references(_read_json_file(real, Path(rel)), kept, n, quant_rec))
        elif Path(name).suffix in _WEIGHT_SUFFIXES or name.endswith(".safetensors"):
            skipped.append(rel)
        elif rel == "README.md":
            shutil.copy2(real, tmp / "SOURCE_README.md")
        else:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(real, tmp / rel)
    return quant_rec, skipped


# ------------------------------------------------------------------------------------------------------- GGUF
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_layout(path) -> dict[str, Any]:
    """The architecture, block count and tensor count of a GGUF file (metadata only)."""
    r, arch, n = read_gguf(Path(path))
    return {"architecture": arch, "block_count": n, "tensors": len(r.tensors), "fields": len(r.fields)}


def prune_gguf_file(src, remove, out, *, overwrite: bool = False) -> dict[str, Any]:
    """Remove blocks ``remove`` (0-based) from the GGUF file ``src`` WITHOUT loading the model, into ``out``.

    The ``blk.<i>.*`` tensors of removed blocks are dropped and the rest renumbered (also the tensors of blocks
    beyond ``block_count``, e.g. multi-token-prediction layers, shifted down); ``<arch>.block_count`` is rewritten,
    every per-layer metadata array of ``<arch>.*`` (length = block count) filtered, ``leading_dense_block_count``
    recounted; every other field is copied with its type; tensor data (quantised or not) is copied byte for byte.
    Refused before anything is written (``ValueError`` naming the file): a file that cannot be parsed or is shorter
    than the tensor data its header declares (:func:`~cbo_utils.model.load.read_gguf`), and one whose
    ``<arch>.block_count`` claims blocks it holds no ``blk.<i>`` tensors for. (``src`` itself may be a link, e.g. a
    Hugging Face cache snapshot's: the path the user names is the source; nothing else is read.) Written atomically
    (a temporary sibling renamed at the end). Returns what was done."""
    from gguf import GGUFValueType, GGUFWriter

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"no GGUF file at {src}")
    check_output(out, overwrite)
    if out.resolve() == src.resolve():
        raise ValueError("the output must be a new file, not the source GGUF")
    r, arch, n = read_gguf(src)
    held = {int(m.group(1)) for t in r.tensors if (m := _GGUF_BLOCK.match(t.name))}
    if not set(range(n)) <= held:
        inside = sorted(held & set(range(n)))
        raise ValueError(f"{src}: {arch}.block_count says {n} blocks but the file holds blk.<i> tensors for "
                         f"{len(inside)} of them ({_ranges(inside) or 'none'}; none for blocks "
                         f"{_ranges(sorted(set(range(n)) - held))}): the header and the tensors disagree, so a pruned "
                         "copy would too — get a consistent GGUF (convert or download it again)")
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
    owner = owning_folder(out)   # e.g. a compress folder: the file is replaced only by its record, and recorded
    if owner is not None and out.exists():
        check_replaceable(owner, out)
    tempfiles.clean_stale(out)   # what a killed earlier write of this output left (a dead owner only)
    fd, tmp = tempfiles.temp_file(out)
    os.close(fd)
    try:
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, t in tensors:
            w.write_tensor_data(t.data)
        w.close()
        os.replace(tmp, out)
        tempfiles.release(tmp)
    except BaseException:
        tempfiles.discard(tmp)
        raise
    if owner is not None:
        record_files(owner, [out])
    rep = {"source": str(src), "out": str(out), "architecture": arch, "removed_blocks": remove,
           "block_count": [n, len(kept)], "tensors": [len(r.tensors), len(tensors)], "fields_rewritten": rewritten}
    write_sidecar(out, provenance("pruned_gguf", {"remove": remove}, **rep))   # marks the file as cbo's own
    return rep
