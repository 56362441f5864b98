"""Blocks, gates and physical block removal.

A *block* is one residual unit of a causal LM: a decoder layer (attention + MLP) for Llama/Mistral/Qwen, one
mixer layer (Mamba2, MoE, attention or MLP) for Nemotron-H. Architectures are handled by small *adapters* kept in a
registry (:data:`ADAPTERS`); :func:`register_adapter` adds one.

Gates (paper §1): block i gets a scalar α_i on its residual branch(es),

    Llama/Qwen:  h ← h + α_i·Attn(norm(h));  h ← h + α_i·MLP(norm(h))
    Nemotron-H:  h ← h + α_i·Mixer(norm(h))

implemented as forward hooks that multiply the branch outputs, so weights are never touched; α = 1 is the
original model and α_i = 0 removes block i. Removal (:func:`remove_blocks`) rebuilds the layer list and rewrites
every index and per-layer config field that depends on depth.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Block-type vocabulary used everywhere in the package (restrictions, plots, tables).
DECODER, ATTENTION, MAMBA, MOE, MLP = "decoder", "attention", "mamba", "moe", "mlp"
#: the block types the package knows (what --only-types and budgets accept)
BLOCK_TYPES = (DECODER, ATTENTION, MAMBA, MOE, MLP)
#: the one block-type vocabulary of hybrid models: native NemotronH layer types, remote-code names, pattern letters
NEMOTRON_NATIVE_TYPES = {"linear_attention": MAMBA, "moe": MOE, "full_attention": ATTENTION, "mlp": MLP}
NATIVE_NAME = {v: k for k, v in NEMOTRON_NATIVE_TYPES.items()}
_NEMOTRON_REMOTE = {"mamba": MAMBA, "moe": MOE, "attention": ATTENTION, "mlp": MLP}
PATTERN_LETTER = {MAMBA: "M", MOE: "E", ATTENTION: "*", MLP: "-"}
LETTER_TYPE = {v: k for k, v in PATTERN_LETTER.items()}


class UnsupportedArchitectureError(ValueError):
    """No registered adapter handles this model (the message says how to register one)."""


class RemovalError(ValueError):
    """A removal that cannot work (the message says what to change)."""


# --------------------------------------------------------------------------------------------------- adapters
@dataclass
class Adapter:
    """How to find, gate, renumber and remove the blocks of one family of architectures.

    Subclass it (or build one with different callables) and pass it to :func:`register_adapter` to support a new
    architecture: ``model_types`` are the ``config.model_type`` values it handles, ``layers_path`` the attribute
    path of the ``nn.ModuleList`` of blocks, ``gate_modules`` the names of the submodules of a block whose outputs
    are the residual branches.
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    gate_modules: tuple[str, ...] = ("self_attn", "mlp")
    hybrid: bool = False
    description: str = ""
    #: attribute names (on the parent of the block list) of the norm between the last block and the LM head
    final_norm_names: tuple[str, ...] = ("norm", "norm_f", "final_layernorm", "final_layer_norm", "ln_f")

    # -- structure
    def matches(self, model: nn.Module) -> bool:
        return getattr(model.config, "model_type", None) in self.model_types and _has_path(model, self.layers_path)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.layers_path)

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent_path, _, attr = self.layers_path.rpartition(".")
        setattr(get_path(model, parent_path) if parent_path else model, attr, layers)

    def block_types(self, model: nn.Module) -> list[str]:
        return [DECODER] * len(self.layers(model))

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The norm between the last block and the LM head (``model.model.norm``, Nemotron-H's ``norm_f``, ...),
        or None when the architecture has none."""
        parent_path = self.layers_path.rpartition(".")[0]
        base = get_path(model, parent_path) if parent_path else model
        for name in self.final_norm_names:
            mod = getattr(base, name, None)
            if isinstance(mod, nn.Module):
                return mod
        return None

    def gate_targets(self, block: nn.Module) -> list[nn.Module]:
        """The modules of ``block`` whose outputs are its residual branches: those of ``gate_modules`` it has (blocks
        of one model may differ, e.g. attention or linear-attention mixers)."""
        found = [getattr(block, n) for n in self.gate_modules if isinstance(getattr(block, n, None), nn.Module)]
        if not found:
            raise UnsupportedArchitectureError(
                f"the {self.name} adapter finds none of the branch modules {self.gate_modules} in a "
                f"{type(block).__name__}; register an adapter with this block's branch modules")
        return found

    # -- removal
    def renumber(self, block: nn.Module, new_idx: int) -> None:
        """Set every ``layer_idx`` found inside the block (block, attention, Mamba mixer, ...) to ``new_idx``."""
        for mod in block.modules():   # an int only: some modules carry an unused layer_idx = None (HunYuan's MLP)
            if isinstance(getattr(mod, "layer_idx", None), int) and not isinstance(mod.layer_idx, bool):
                mod.layer_idx = new_idx

    def rewrite_config(self, config, kept: Sequence[int], n_original: int) -> None:
        """Apply :func:`remap_layer_fields` to the config object (derived read-only properties such as NemotronH's
        ``num_hidden_layers`` follow by themselves)."""
        for name, value in remap_layer_fields(_config_fields(config), kept, n_original).items():
            if not isinstance(getattr(type(config), name, None), property):
                setattr(config, name, value)

    def config_json_extras(self, config) -> dict:
        """Keys to write into the saved ``config.json`` beyond what ``save_pretrained`` writes."""
        return {}


#: per-layer lists that hold either one 0/1 flag per layer or a list of layer indices
_FLAG_OR_INDEX_LISTS = ("mlp_only_layers", "no_rope_layers")


def remap_layer_fields(fields: Mapping[str, Any], kept: Sequence[int], n_original: int) -> dict[str, Any]:
    """The new values of the depth-dependent fields among ``fields`` (a config's attributes, or a ``config.json``
    dict) when blocks ``kept`` of ``n_original`` stay — the one rule for models in memory
    (:meth:`Adapter.rewrite_config`) and checkpoint files (:func:`cbo_utils.prune.files.prune_config_dict`).

    ``layers_block_type`` / ``layer_types`` and ``hybrid_override_pattern`` filtered; ``num_hidden_layers`` = kept
    count; ``max_window_layers`` recounted (Qwen2/3: layers below it use full attention); ``mlp_only_layers`` /
    ``no_rope_layers`` remapped (flag lists filtered, index lists renumbered); Qwen-MoE's ``decoder_sparse_step``
    turned into the explicit ``mlp_only_layers`` it implies (step 1); ``first_k_dense_replace`` recounted (the kept
    dense layers are still the first ones); any other list whose name contains ``layer`` with one non-integer entry
    per layer filtered. Fields not returned stay as they are.
    """
    kept = list(kept)
    new: dict[str, Any] = {}
    for name in ("layers_block_type", "layer_types"):
        v = fields.get(name)
        if isinstance(v, (list, tuple)) and len(v) == n_original:
            new[name] = [v[i] for i in kept]
    pat = fields.get("hybrid_override_pattern")
    if isinstance(pat, str) and len(pat) == n_original:
        new["hybrid_override_pattern"] = "".join(pat[i] for i in kept)
    new["num_hidden_layers"] = len(kept)
    mwl = fields.get("max_window_layers")
    if isinstance(mwl, int) and not isinstance(mwl, bool):
        new["max_window_layers"] = sum(1 for i in kept if i < mwl)
    new_of = {old: new_i for new_i, old in enumerate(kept)}
    step = fields.get("decoder_sparse_step")   # Qwen2/3-MoE: layer i is sparse iff i ∉ mlp_only_layers and
    if _is_int(step) and step >= 1 and "mlp_only_layers" in fields:   # (i + 1) % step == 0 → an explicit list
        only = set(fields.get("mlp_only_layers") or [])
        experts = fields.get("num_experts", fields.get("num_local_experts")) or 0   # (an alias in transformers 5)
        dense = [i for i in range(n_original) if i in only or not (experts > 0 and (i + 1) % step == 0)]
        new["decoder_sparse_step"] = 1
        new["mlp_only_layers"] = [new_of[i] for i in dense if i in new_of]
    k = fields.get("first_k_dense_replace")   # DeepSeek-V3, GLM-4-MoE: layers below k are dense (a prefix stays one)
    if _is_int(k):
        new["first_k_dense_replace"] = sum(1 for i in kept if i < k)
    for name in _FLAG_OR_INDEX_LISTS:
        v = fields.get(name)
        if name in new or not isinstance(v, (list, tuple)) or not v:
            continue
        if len(v) == n_original and n_original > 1 and all(isinstance(x, (bool, int)) and x in (0, 1) for x in v):
            new[name] = [v[i] for i in kept]  # a per-layer flag list
        else:  # a list of layer indices
            new[name] = [new_of[x] for x in v if x in new_of]
    for name, v in fields.items():
        if (name not in new and name not in _FLAG_OR_INDEX_LISTS and "layer" in name.lower()
                and isinstance(v, (list, tuple)) and len(v) == n_original
                and not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            new[name] = [v[i] for i in kept]
    return new


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _config_fields(config) -> dict[str, Any]:
    """A config object's fields as a dict (``to_dict`` of a ``PretrainedConfig``; public attributes otherwise)."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return {k: getattr(config, k) for k in dir(config) if not k.startswith("_") and not callable(getattr(config, k))}


class NemotronHNativeAdapter(Adapter):
    def block_types(self, model):
        return [NEMOTRON_NATIVE_TYPES[t] for t in model.config.layers_block_type]

    def gate_targets(self, block):
        return [block.mixer]

    def config_json_extras(self, config):
        types = [NEMOTRON_NATIVE_TYPES[t] for t in config.layers_block_type]
        return {"hybrid_override_pattern": "".join(PATTERN_LETTER[t] for t in types),
                "num_hidden_layers": len(types)}


class NemotronHRemoteAdapter(Adapter):
    """The authors' remote-code layout (``trust_remote_code``): blocks at ``model.backbone.layers``, the pattern in
    ``config.hybrid_override_pattern``."""

    def block_types(self, model):
        layers = self.layers(model)
        if all(hasattr(b, "block_type") for b in layers):
            return [_NEMOTRON_REMOTE.get(b.block_type, b.block_type) for b in layers]
        letters = LETTER_TYPE
        return [letters[c] for c in model.config.hybrid_override_pattern]

    def gate_targets(self, block):
        return [block.mixer]

    def config_json_extras(self, config):
        return {"hybrid_override_pattern": config.hybrid_override_pattern, "num_hidden_layers": len(
            config.hybrid_override_pattern)}


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter, *, override: bool = False) -> Adapter:
    """Add an architecture adapter to the registry (checked in insertion order; the first that matches wins)."""
    if adapter.name in ADAPTERS and not override:
        raise ValueError(f"an adapter named {adapter.name!r} is already registered; pass override=True to replace it")
    ADAPTERS[adapter.name] = adapter
    return adapter


#: pre-norm decoders: h ← h + α·Attn(norm(h)); h ← h + α·MLP(norm(h)) (Granite's residual multiplier and Phi-3's
#: residual dropout act after the gate, which is linear)
PRE_NORM = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "starcoder2", "granite", "olmo", "gemma",
            "ernie4_5", "seed_oss", "arcee", "hunyuan_v1_dense", "apertus")
#: post-branch norms: h ← h + α·norm(Attn(…)) — the gate multiplies the normalised branch (gating before an RMSNorm
#: would do nothing)
POST_NORM = ("gemma2", "gemma3_text", "olmo2", "olmo3", "exaone4")
#: parallel residual: h ← h + α·Attn(norm(h)) + α·MLP(norm(h)) (one gate on both)
PARALLEL = ("phi", "cohere", "cohere2")
#: MoE decoders: the gate on the attention output and on the whole MoE output (router, experts, shared experts)
MOE_DECODERS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss")

register_adapter(Adapter("llama-family", PRE_NORM, description="pre-norm decoder layers at model.model.layers; "
                                                               "one gate on the attention and MLP outputs"))
register_adapter(Adapter("post-norm", POST_NORM,
                         gate_modules=("post_attention_layernorm", "post_feedforward_layernorm"),
                         description="post-branch norms (Gemma 2/3, OLMo 2/3, EXAONE 4): one gate on the normalised "
                                     "attention and MLP outputs"))
register_adapter(Adapter("glm4", ("glm4",), gate_modules=("post_self_attn_layernorm", "post_mlp_layernorm"),
                         description="GLM-4 sandwich norms: one gate on the normalised attention and MLP outputs"))
register_adapter(Adapter("parallel", PARALLEL, description="parallel residual (Phi, Cohere): attention and MLP read "
                                                           "the same input; one gate on both outputs"))
register_adapter(Adapter("gpt-neox", ("gpt_neox",), layers_path="gpt_neox.layers", gate_modules=("attention", "mlp"),
                         description="GPT-NeoX/Pythia at gpt_neox.layers (parallel or sequential residual); one "
                                     "gate on the attention and MLP outputs"))
register_adapter(Adapter("moe", MOE_DECODERS, description="MoE decoders (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3, "
                                                          "GLM-4-MoE, GPT-OSS): one gate on the attention and the "
                                                          "whole MoE output"))
register_adapter(Adapter("granite-moe", ("granitemoe",), gate_modules=("self_attn", "block_sparse_moe"),
                         description="Granite-MoE: one gate on the attention and the MoE outputs"))
register_adapter(Adapter("falcon-h1", ("falcon_h1",), gate_modules=("mamba", "self_attn", "feed_forward"),
                         description="Falcon-H1 hybrid layers (Mamba2 and attention in parallel, then the MLP): one "
                                     "gate on all three branches"))
register_adapter(NemotronHNativeAdapter("nemotron_h", ("nemotron_h",), gate_modules=("mixer",), hybrid=True,
                                        description="native NemotronH, model.model.layers; one gate per mixer"))
register_adapter(NemotronHRemoteAdapter("nemotron_h-remote", ("nemotron_h",), layers_path="backbone.layers",
                                        gate_modules=("mixer",), hybrid=True,
                                        description="remote-code NemotronH, model.backbone.layers"))


def get_adapter(model: nn.Module) -> Adapter:
    """The registered adapter that handles ``model``; for an architecture none handles, an adapter discovered and
    verified on the model (:func:`discover_adapter`); otherwise a clear error naming what is supported."""
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    found, why = discover_adapter(model)
    if found is not None:
        return register_adapter(found)
    mt = getattr(getattr(model, "config", None), "model_type", None)
    supported = "; ".join(f"{a.name} ({', '.join(a.model_types)}: {a.description})" for a in ADAPTERS.values())
    raise UnsupportedArchitectureError(
        f"no block adapter for model_type={mt!r} ({type(model).__name__}), and none could be discovered: {why}. "
        f"Supported: {supported}. To add an architecture, register an adapter: "
        "cbo_utils.model.blocks.register_adapter(Adapter(name=..., model_types=("
        f"{mt!r},), layers_path='model.layers', gate_modules=('self_attn', 'mlp')))."
    )


#: branch-module name sets :func:`discover_adapter` tries, in this order (post-branch norms first: gating the branch
#: *before* such a norm passes the α = 0 check but hardly acts for 0 < α < 1, which the verification catches)
DISCOVERY_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("post_attention_layernorm", "post_feedforward_layernorm"), ("post_self_attn_layernorm", "post_mlp_layernorm"),
    ("self_attn", "mlp"), ("attention", "mlp"), ("self_attn", "feed_forward"), ("attn", "mlp"),
    ("self_attn", "block_sparse_moe"), ("mamba", "self_attn", "feed_forward"), ("linear_attn", "self_attn", "mlp"),
    ("mixer",),
)
_DISCOVERY_FAILED: dict[tuple[str, str], str] = {}


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The attribute path and ModuleList of the blocks: the longest ModuleList of ``num_hidden_layers`` entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and name]
    return max(lists, key=lambda t: (len(t[1]), -t[0].count("."))) if lists else None


@torch.no_grad()
def verify_adapter(model: nn.Module, adapter: Adapter, probe: torch.Tensor | None = None) -> str | None:
    """Whether ``adapter`` gates ``model`` as the paper does, tested on the model itself: α = 1 leaves the logits
    unchanged, α = 0 on a block equals the model without it, and α = 0.9 moves the logits by at least 3 % of what
    α = 0 does (a linear branch: ~10 %; a gate before a norm is scale-invariant, ≪ 1 %). Returns None when every
    check passes, else what failed. Verify on trained weights: in a freshly initialised model (norm weights all 1)
    norm(norm(h)) = norm(h) can hide a block that normalises the residual stream itself."""
    layers = adapter.layers(model)
    n = len(layers)
    if n < 2:
        return "fewer than 2 blocks"
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    dev = next(model.parameters()).device
    x = probe if probe is not None else torch.randint(1, max(2, min(vocab, 1000)), (1, 8),
                                                      generator=torch.Generator().manual_seed(0)).to(dev)
    ref = model(input_ids=x, use_cache=False).logits.float()
    b = n // 2
    try:
        with Gates(model, adapter=adapter) as gates:
            same = model(input_ids=x, use_cache=False).logits.float()
            with gates.removed([b]):
                gated = model(input_ids=x, use_cache=False).logits.float()
            a = torch.ones(n)
            a[b] = 0.9
            gates.alpha = a
            half = model(input_ids=x, use_cache=False).logits.float()
        with without_blocks(model, [b], adapter):
            skipped = model(input_ids=x, use_cache=False).logits.float()
    except Exception as e:   # a candidate that does not fit this model (missing module, shape, ...)
        return f"{type(e).__name__}: {e}"
    scale = 1e-4 * (1.0 + float(ref.abs().max()))
    if float((same - ref).abs().max()) > scale:
        return "α = 1 changes the logits"
    if float((gated - skipped).abs().max()) > scale:
        return "α = 0 on a block is not the model without it"
    d0, dh = float((gated - ref).abs().max()), float((half - ref).abs().max())
    if d0 <= scale or dh < 0.03 * d0:
        return "α = 0.9 hardly moves the logits (a gate before a norm?)"
    return None


def discover_adapter(model: nn.Module) -> tuple[Adapter | None, str]:
    """An adapter for an architecture no registered one handles: the block list found by :func:`_block_list`, the
    first branch-module set of :data:`DISCOVERY_CANDIDATES` present in every block that passes
    :func:`verify_adapter` on the model. Returns (adapter, "") or (None, why not); failures are remembered per
    model type and class."""
    config = getattr(model, "config", None)
    mt = str(getattr(config, "model_type", None))
    key = (mt, type(model).__name__)
    if key in _DISCOVERY_FAILED:
        return None, _DISCOVERY_FAILED[key]
    found = _block_list(model) if config is not None else None
    if found is None:
        _DISCOVERY_FAILED[key] = "no ModuleList of num_hidden_layers blocks"
        return None, _DISCOVERY_FAILED[key]
    path, layers = found
    tried = []
    for names in DISCOVERY_CANDIDATES:
        if not all(any(isinstance(getattr(blk, nm, None), nn.Module) for nm in names) for blk in layers):
            continue
        cand = Adapter(f"discovered:{mt}", (mt,), layers_path=path, gate_modules=names,
                       description=f"discovered and verified on the model: blocks at {path}, gates on {names}")
        why = verify_adapter(model, cand)
        if why is None:
            return cand, ""
        tried.append(f"{'/'.join(names)}: {why}")
    _DISCOVERY_FAILED[key] = (f"blocks at {path}; " + "; ".join(tried)) if tried else \
        f"blocks at {path}, but none of the known branch modules in them"
    return None, _DISCOVERY_FAILED[key]


def get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has_path(obj, path: str) -> bool:
    try:
        return isinstance(get_path(obj, path), nn.ModuleList)
    except AttributeError:
        return False


@dataclass
class BlockInfo:
    index: int
    type: str
    parameters: int


def describe_blocks(model: nn.Module) -> list[BlockInfo]:
    """One :class:`BlockInfo` per block: 0-based index, type and parameter count."""
    adapter = get_adapter(model)
    types = adapter.block_types(model)
    return [BlockInfo(i, t, sum(p.numel() for p in b.parameters())) for i, (b, t) in
            enumerate(zip(adapter.layers(model), types, strict=True))]


def final_norm(model: nn.Module) -> nn.Module | None:
    """The final norm of ``model`` (:meth:`Adapter.final_norm`)."""
    return get_adapter(model).final_norm(model)


def num_blocks(model: nn.Module) -> int:
    """Number of blocks N of ``model``."""
    return len(get_adapter(model).layers(model))


def block_types(model: nn.Module) -> list[str]:
    """Type of each block: ``decoder`` (attention + MLP) or, for hybrids, ``mamba``/``moe``/``attention``/``mlp``."""
    return get_adapter(model).block_types(model)


# ------------------------------------------------------------------------------------------------------ gates
@dataclass
class Gates:
    """α gates on the residual branches of every block, as forward hooks.

    ``alpha`` is one float32 tensor of N scalars (requires grad) by default. It may be replaced by any tensor whose
    last dimension is N — a (B, N) tensor gives every sample of a batch its own gates (per-sample gradients in one
    backward pass) — the hooks read it when they run. Attaching freezes every weight (no weight gradients are
    ever allocated); :meth:`detach` removes the hooks and restores ``requires_grad``.
    """

    model: nn.Module
    alpha: torch.Tensor = None
    adapter: Adapter = None
    _handles: list = field(default_factory=list, repr=False)
    _requires_grad: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.adapter = self.adapter or get_adapter(self.model)
        n = len(self.adapter.layers(self.model))
        if self.alpha is None:
            self.alpha = torch.ones(n, dtype=torch.float32, requires_grad=True)
        if self.alpha.shape[-1] != n:
            raise ValueError(f"alpha has {self.alpha.shape[-1]} entries but the model has {n} blocks")

    @property
    def n(self) -> int:
        return self.alpha.shape[-1]

    def attach(self) -> Gates:
        if self._handles:
            return self
        for name, p in self.model.named_parameters():
            self._requires_grad[name] = p.requires_grad
            p.requires_grad_(False)
        for i, block in enumerate(self.adapter.layers(self.model)):
            for target in self.adapter.gate_targets(block):
                self._handles.append(target.register_forward_hook(self._make_hook(i)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, p in self.model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])
        self._requires_grad.clear()

    def __enter__(self) -> Gates:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _make_hook(self, i: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            a = self.alpha[..., i]
            if a.dim() == 1:  # per-sample gates, shape (B,)
                a = a.view(-1, *([1] * (out.dim() - 1)))
            out = out * a.to(device=out.device, dtype=out.dtype)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    def reset(self, value: float = 1.0) -> None:
        with torch.no_grad():
            self.alpha = torch.full((self.n,), float(value), dtype=torch.float32, requires_grad=True)

    @contextlib.contextmanager
    def removed(self, blocks: Iterable[int]):
        """Temporarily set α = 0 on ``blocks`` (the masked model that a pruned model must equal)."""
        old = self.alpha
        a = old.detach().clone()
        a[..., list(blocks)] = 0.0
        self.alpha = a
        try:
            yield self
        finally:
            self.alpha = old


# ---------------------------------------------------------------------------------------------------- removal
def check_indices(remove: Iterable[int], n: int, types: Sequence[str], hybrid: bool,
                  *, what: str = "this model") -> list[int]:
    """Validate a removal set for a stack of ``n`` blocks of ``types`` and return it sorted; raise
    :class:`RemovalError` saying what to do otherwise. The one rule for models in memory (:func:`check_removal`) and
    checkpoint folders (:func:`cbo_utils.prune.files.prune_checkpoint_files`)."""
    remove = list(remove)
    bad = [b for b in remove if isinstance(b, bool) or not hasattr(b, "__index__")]
    if bad:
        raise RemovalError(f"block indices must be integers, got {bad!r}")
    remove = [operator.index(b) for b in remove]
    out_of_range = sorted({b for b in remove if b < 0 or b >= n})
    if out_of_range:
        raise RemovalError(f"block indices {out_of_range} are out of range: {what} has {n} blocks, numbered "
                           f"0..{n - 1} (indices are 0-based)")
    dupes = sorted({b for b in remove if remove.count(b) > 1})
    if dupes:
        raise RemovalError(f"block indices {dupes} are listed more than once; list each block to remove once")
    if not remove:
        raise RemovalError("nothing to remove: give at least one block index")
    if len(remove) >= n:
        raise RemovalError(f"removing all {n} blocks leaves no model; remove at most {n - 1}")
    att = [i for i, t in enumerate(types) if t == ATTENTION]
    if hybrid and att and not set(att) - set(remove):
        raise RemovalError(f"this removal takes out every attention block {att} of a hybrid model; at least one "
                           "must remain (cached generation needs it). Keep one of them (`cbo solve` returns only such "
                           "states; with `cbo prune --remove`, leave one out of the list)")
    return sorted(remove)


def check_removal(model: nn.Module, remove: Iterable[int], adapter: Adapter | None = None) -> list[int]:
    """Validate a removal set for ``model`` (:func:`check_indices`) and return it sorted."""
    adapter = adapter or get_adapter(model)
    return check_indices(remove, len(adapter.layers(model)), adapter.block_types(model), adapter.hybrid)


def remove_blocks(model: nn.Module, remove: Iterable[int], adapter: Adapter | None = None) -> nn.Module:
    """Physically remove ``remove`` (0-based indices of ``model``) **in place** and return the model.

    Rebuilds the layer ``ModuleList`` from the kept blocks, renumbers every ``layer_idx`` (block, attention, Mamba
    mixer), and rewrites the depth-dependent config fields (``num_hidden_layers``, ``layer_types``,
    ``layers_block_type``, ``max_window_layers``, ...). Records the removal in ``config.cbo_removed_blocks``
    (cumulative, in indices of the original model).
    """
    adapter = adapter or get_adapter(model)
    remove = check_removal(model, remove, adapter)
    layers = adapter.layers(model)
    n = len(layers)
    kept = [i for i in range(n) if i not in set(remove)]
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_idx, block in enumerate(new_layers):
        adapter.renumber(block, new_idx)
    adapter.set_layers(model, new_layers)
    adapter.rewrite_config(model.config, kept, n)
    model.config.cbo_removed_blocks = cumulative_removed(getattr(model.config, "cbo_removed_blocks", None), remove, n)
    return model


@contextlib.contextmanager
def without_blocks(model: nn.Module, remove: Iterable[int], adapter: Adapter | None = None):
    """The model with ``remove`` physically taken out **in place** for the duration of the block, restored after:
    the pruned model of :func:`remove_blocks` without a copy of the weights, and without spending the removed blocks'
    compute as the gated model does (α = 0 still runs them). Its outputs equal the gated model's bitwise (the kept
    blocks see the same inputs: h + 0·f(h) = h). The layer list, every ``layer_idx`` and the config (every field
    :func:`remove_blocks` rewrites) are restored on exit, also after an error. An empty ``remove`` changes nothing."""
    remove = list(remove)
    if not remove:
        yield model
        return
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    saved_idx = [(mod, mod.layer_idx) for mod in model.modules()
                 if hasattr(mod, "layer_idx") and not isinstance(mod.layer_idx, (list, tuple))]
    saved_config = copy.deepcopy(model.config.__dict__)
    try:
        remove_blocks(model, remove, adapter)
        yield model
    finally:
        adapter.set_layers(model, layers)
        for mod, idx in saved_idx:
            mod.layer_idx = idx
        now = model.config.__dict__
        for k in [k for k in now if k not in saved_config]:
            del now[k]
        for k, v in saved_config.items():
            if k not in now or now[k] != v:   # only the rewritten fields get their saved copies back
                now[k] = v


def cumulative_removed(previous: Sequence[int] | None, remove: Iterable[int], n: int) -> list[int]:
    """``cbo_removed_blocks`` after removing ``remove`` (indices of a model of ``n`` blocks) from a model that had
    already lost ``previous`` (indices of the first model): every index in terms of the first model."""
    previous = sorted(int(b) for b in previous or [])
    remove = sorted(int(b) for b in remove)
    if not previous:
        return remove
    orig_kept = [i for i in range(n + len(previous)) if i not in set(previous)]
    return sorted(set(previous) | {orig_kept[i] for i in remove})


def model_layers(model):
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    return adapter, layers, len(layers)


# ----------------------------------------------------------------------------------- sliding-window merging
def merged_parameters(layers: nn.ModuleList, low: int, high: int) -> dict[str, torch.Tensor]:
    """Parameters of blocks ``low..high`` merged into one: θ = θ_low + Σ_{k=low+1}^{high} (θ_k − θ_low) for every
    parameter of the block (weights, biases and norm weights), computed in float64 from the ORIGINAL weights and
    cast back to the parameter's dtype."""
    base = dict(layers[low].named_parameters())
    others = [dict(layers[k].named_parameters()) for k in range(low + 1, high + 1)]
    out = {}
    for name, p in base.items():
        p0 = p.detach().double()
        acc = p0.clone()
        for other in others:
            acc += other[name].detach().double() - p0
        out[name] = acc.to(p.dtype)
    return out


def merge_windows(model: nn.Module, windows, removed: Iterable[int] | None = None) -> nn.Module:
    """A merged, physically shortened COPY of ``model``: for every window ``(low, high)`` block ``low`` gets
    :func:`merged_parameters` of blocks low..high, blocks low+1..high are removed (:func:`remove_blocks`);
    ``config.cbo_merged_windows`` records the windows. ``removed``, when given, must be the blocks the windows remove.
    ``model`` is untouched."""
    windows = [(int(a), int(b)) for a, b in windows]
    implied = sorted(k for a, b in windows for k in range(a + 1, b + 1))
    if removed is not None and implied != sorted(int(i) for i in removed):
        raise ValueError(f"the windows {windows} remove {implied}, not {sorted(removed)}")
    _, layers, _ = model_layers(model)
    new = copy.deepcopy(model)
    _, new_layers, _ = model_layers(new)
    with torch.no_grad():
        for a, b in windows:
            merged = merged_parameters(layers, a, b)
            for name, p in new_layers[a].named_parameters():
                p.copy_(merged[name])
    remove_blocks(new, implied)
    new.config.cbo_merged_windows = [[a, b] for a, b in windows]
    return new


def pattern_types(pattern: str) -> list[str]:
    """Block types (``mamba``/``moe``/``attention``/``mlp``, as :func:`cbo_utils.model.blocks.block_types` names them)
    of a NemotronH pattern string such as :data:`NANO_PATTERN`."""
    bad = sorted({c for c in pattern if c not in LETTER_TYPE})
    if bad or not pattern:
        raise ValueError(f"pattern {pattern!r} has unknown letters {bad}: use M (Mamba2), E (MoE), * (attention), "
                         "- (MLP)" if bad else "the pattern is empty")
    return [LETTER_TYPE[c] for c in pattern]
