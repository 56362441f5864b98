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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

# Block-type vocabulary used everywhere in the package (restrictions, plots, tables).
DECODER, ATTENTION, MAMBA, MOE, MLP = "decoder", "attention", "mamba", "moe", "mlp"
#: the one block-type vocabulary of hybrid models: native NemotronH layer types, remote-code names, pattern letters
NEMOTRON_NATIVE_TYPES = {"linear_attention": MAMBA, "moe": MOE, "full_attention": ATTENTION, "mlp": MLP}
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

    def gate_targets(self, block: nn.Module) -> list[nn.Module]:
        return [getattr(block, n) for n in self.gate_modules]

    # -- removal
    def renumber(self, block: nn.Module, new_idx: int) -> None:
        """Set every ``layer_idx`` found inside the block (block, attention, Mamba mixer, ...) to ``new_idx``."""
        for mod in block.modules():
            if hasattr(mod, "layer_idx") and not isinstance(mod.layer_idx, (list, tuple)):
                mod.layer_idx = new_idx

    def rewrite_config(self, config, kept: Sequence[int], n_original: int) -> None:
        config.num_hidden_layers = len(kept)
        lt = getattr(config, "layer_types", None)
        if isinstance(lt, (list, tuple)) and len(lt) == n_original:
            config.layer_types = [lt[i] for i in kept]
        mwl = getattr(config, "max_window_layers", None)
        if isinstance(mwl, int):  # layers with index < max_window_layers use full attention (Qwen2/3)
            config.max_window_layers = sum(1 for i in kept if i < mwl)
        for name in ("mlp_only_layers", "no_rope_layers"):
            _remap_layer_field(config, name, kept, n_original)

    def config_json_extras(self, config) -> dict:
        """Keys to write into the saved ``config.json`` beyond what ``save_pretrained`` writes."""
        return {}


def _remap_layer_field(config, name: str, kept: Sequence[int], n_original: int) -> None:
    val = getattr(config, name, None)
    if not isinstance(val, (list, tuple)) or not val:
        return
    if len(val) == n_original and all(isinstance(v, (bool, int)) and v in (0, 1) for v in val) and n_original > 1:
        setattr(config, name, [val[i] for i in kept])  # a per-layer flag list
    else:  # a list of layer indices
        new = {old: new for new, old in enumerate(kept)}
        setattr(config, name, [new[v] for v in val if v in new])


class NemotronHNativeAdapter(Adapter):
    def block_types(self, model):
        return [NEMOTRON_NATIVE_TYPES[t] for t in model.config.layers_block_type]

    def gate_targets(self, block):
        return [block.mixer]

    def rewrite_config(self, config, kept, n_original):
        config.layers_block_type = [config.layers_block_type[i] for i in kept]

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

    def rewrite_config(self, config, kept, n_original):
        pattern = getattr(config, "hybrid_override_pattern", None)
        if pattern is not None:
            config.hybrid_override_pattern = "".join(pattern[i] for i in kept)
        config.num_hidden_layers = len(kept)

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


register_adapter(Adapter("llama-family", ("llama", "mistral", "qwen2", "qwen3"),
                         description="decoder layers at model.model.layers; one gate on attention and MLP"))
register_adapter(NemotronHNativeAdapter("nemotron_h", ("nemotron_h",), gate_modules=("mixer",), hybrid=True,
                                        description="native NemotronH, model.model.layers; one gate per mixer"))
register_adapter(NemotronHRemoteAdapter("nemotron_h-remote", ("nemotron_h",), layers_path="backbone.layers",
                                        gate_modules=("mixer",), hybrid=True,
                                        description="remote-code NemotronH, model.backbone.layers"))


def get_adapter(model: nn.Module) -> Adapter:
    """The registered adapter that handles ``model``, or a clear error naming what is supported."""
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    mt = getattr(getattr(model, "config", None), "model_type", None)
    supported = "; ".join(f"{a.name} ({', '.join(a.model_types)}: {a.description})" for a in ADAPTERS.values())
    raise UnsupportedArchitectureError(
        f"no block adapter for model_type={mt!r} ({type(model).__name__}). Supported: {supported}. To add an "
        "architecture, register an adapter: cbo_utils.model.blocks.register_adapter(Adapter(name=..., model_types=("
        f"{mt!r},), layers_path='model.layers', gate_modules=('self_attn', 'mlp')))."
    )


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
def check_removal(model: nn.Module, remove: Iterable[int]) -> list[int]:
    """Validate a removal set and return it sorted; raise :class:`RemovalError` saying what to do otherwise."""
    adapter = get_adapter(model)
    n = len(adapter.layers(model))
    remove = list(remove)
    bad = [b for b in remove if not isinstance(b, (int,)) and not (hasattr(b, "__index__"))]
    if bad:
        raise RemovalError(f"block indices must be integers, got {bad!r}")
    remove = [int(b) for b in remove]
    out_of_range = sorted({b for b in remove if b < 0 or b >= n})
    if out_of_range:
        raise RemovalError(f"block indices {out_of_range} are out of range: this model has {n} blocks, numbered "
                           f"0..{n - 1} (indices are 0-based)")
    dupes = sorted({b for b in remove if remove.count(b) > 1})
    if dupes:
        raise RemovalError(f"block indices {dupes} are listed more than once; list each block to remove once")
    if not remove:
        raise RemovalError("nothing to remove: give at least one block index")
    if len(remove) >= n:
        raise RemovalError(f"removing all {n} blocks leaves no model; remove at most {n - 1}")
    types = adapter.block_types(model)
    if adapter.hybrid and ATTENTION in types:
        left = [i for i, t in enumerate(types) if t == ATTENTION and i not in remove]
        if not left:
            att = [i for i, t in enumerate(types) if t == ATTENTION]
            raise RemovalError(f"this removal takes out every attention block {att} of a hybrid model; at least one "
                               "must remain (cached generation needs it). Keep one of them, e.g. with --keep.")
    return sorted(remove)


def remove_blocks(model: nn.Module, remove: Iterable[int]) -> nn.Module:
    """Physically remove ``remove`` (0-based indices of ``model``) **in place** and return the model.

    Rebuilds the layer ``ModuleList`` from the kept blocks, renumbers every ``layer_idx`` (block, attention, Mamba
    mixer), and rewrites the depth-dependent config fields (``num_hidden_layers``, ``layer_types``,
    ``layers_block_type``, ``max_window_layers``, ...). Records the removal in ``config.cbo_removed_blocks``
    (cumulative, in indices of the original model).
    """
    adapter = get_adapter(model)
    remove = check_removal(model, remove)
    layers = adapter.layers(model)
    n = len(layers)
    kept = [i for i in range(n) if i not in set(remove)]
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_idx, block in enumerate(new_layers):
        adapter.renumber(block, new_idx)
    adapter.set_layers(model, new_layers)
    adapter.rewrite_config(model.config, kept, n)
    prev = getattr(model.config, "cbo_removed_blocks", None) or []
    if prev:  # map indices of the already-shrunk model back to the original model
        orig_kept = [i for i in range(n + len(prev)) if i not in set(prev)]
        remove = sorted(set(prev) | {orig_kept[i] for i in remove})
    model.config.cbo_removed_blocks = list(remove)
    return model


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
    """Block types (``mamba``/``moe``/``attention``/``mlp``, as :func:`cbo_utils.model.blocks.block_types` names them) of
    a NemotronH pattern string such as :data:`NANO_PATTERN`."""
    bad = sorted({c for c in pattern if c not in LETTER_TYPE})
    if bad or not pattern:
        raise ValueError(f"pattern {pattern!r} has unknown letters {bad}: use M (Mamba2), E (MoE), * (attention), "
                         "- (MLP)" if bad else "the pattern is empty")
    return [LETTER_TYPE[c] for c in pattern]
