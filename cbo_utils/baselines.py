"""Baseline block-removal criteria, in one harness with the same calibration data as CBO (PEERS.md §1).

Every method is ``f(model, calibration, M, ...) -> Selection`` and consumes the same :class:`CalibrationSet` that
CBO's gradients use (batch size 1 by default). Indices are 0-based indices of the ORIGINAL model.

============================  =====================================================================================
``block_influence``           BI_i = 1 − mean_tokens cos(x_i, y_i), x_i / y_i = input / output of block i (ShortGPT);
                              one shot: the M lowest; ``iterative=True``: remove the lowest, recompute on the
                              shrunken (gated) model, M times; ``relative`` = indices in the model of that step.
``norm_ratio``                mean_tokens ‖y_i‖/‖x_i‖; the M lowest, one shot.
``angular_distance``          D(ℓ) = mean_samples (1/π)·arccos cos(x^ℓ_T, x^{ℓ+M}_T) on each sample's last real token,
                              x^ℓ = input of block ℓ, x^N = output of the last block (before the final norm);
                              remove [ℓ*, ℓ*+M), ℓ* = argmin D (Gromov et al. 2024).
``tail``                      the M blocks before the last one: [N−1−M, N−1).
``one_shot_perplexity``       I_i = calibration perplexity with only block i removed; the M lowest (Shortened LLaMA).
``taylor_plus``               I_i = Σ_{W ∈ block i} Σ_rows |Σ_cols W ⊙ ∂L/∂W|; blocks 0–3 and the last 2 kept; the M
                              lowest (Shortened LLaMA "Taylor+").
``sleb``                      greedy: M times remove the block whose removal (given those removed) gives the lowest
                              calibration NLL; first and last block never removed (Song et al. 2024).
``sliding_window_merging``    top-down merging of consecutive blocks while cos(final hidden, original) > threshold;
                              threshold bisected to reach M (the paper's SWM, after Ding et al. 2025);
                              :func:`build_swm_model` gives the merged, shortened copy.
``random_selection``          a uniform M-subset (seeded); :func:`random_selections` for several seeds.
============================  =====================================================================================

Conventions shared by all methods:

- Block inputs and outputs come from forward (pre-)hooks on the blocks — never ``output_hidden_states[-1]``, which
  is after the final norm. Token statistics are means over every real (non-pad) token of every sample (each token
  weighs the same); padding never enters (right padding with an attention mask when ``batch_size > 1``).
- "Calibration NLL" (SLEB, one-shot PPL) = Σ token NLL / number of predicted tokens over the whole set (token
  weighted, the perplexity convention; PPL = exp of it). Every next token counts, as in CBO's gradients;
  ``response_only=True`` counts only ``loss_mask`` tokens. Taylor+ differentiates CBO's loss L = mean over samples
  of the per-sample mean NLL (:func:`cbo_utils.hessian.sample_loss`). With fixed-length windows and all tokens
  counted the two are the same.
- Removal during a search is the gated model (α = 0, :class:`cbo_utils.blocks.Gates`), which equals physical
  removal. Hybrid models (Nemotron-H) never lose their last attention block: candidates that would do so are
  skipped (greedy methods) or passed over for the next-lowest score (one-shot methods).
- Ties in a score are broken by the lower block index.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import atomic_write_text, format_blocks, write_sidecar
from .blocks import ATTENTION, Gates, _get_path, check_removal, get_adapter, remove_blocks
from .calibration import CalibrationSet
from .hessian import _collate, sample_loss
from .models import model_device

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- Selection
@dataclass
class Selection:
    """The blocks one baseline removes, with how it got there.

    ``removed``: sorted 0-based indices of the original model. ``order``: the order in which blocks were chosen
    (original indices; greedy methods). ``relative``: iterative BI's indices relative to the shrinking model at each
    step (the paper's Table 2 convention). ``scores``: per-block scores of the first step (None where a block was
    not a candidate). ``seconds``: wall-clock of the selection. ``calibration``: ``CalibrationSet.describe()``.
    """

    method: str
    M: int
    removed: list[int]
    order: list[int] | None = None
    relative: list[int] | None = None
    scores: list[float | None] | None = None
    seconds: float = 0.0
    calibration: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.removed = sorted(int(b) for b in self.removed)

    def to_row(self) -> dict[str, Any]:
        """A flat dict for a ``selections.csv`` table (block lists as ``"3 7 12"``, meta keys as ``meta_<key>``)."""
        cal = self.calibration or {}
        row: dict[str, Any] = {
            "method": self.method, "M": self.M, "removed": format_blocks(self.removed),
            "order": _join(self.order), "relative": _join(self.relative), "seconds": round(float(self.seconds), 3),
            "calibration_source": cal.get("source"), "calibration_samples": cal.get("samples"),
            "calibration_tokens": cal.get("tokens"), "calibration_sha256": cal.get("sha256"),
            "scores": "" if self.scores is None else " ".join(
                "nan" if s is None else f"{s:.6g}" for s in self.scores),
        }
        for k, v in self.meta.items():
            row[f"meta_{k}"] = v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(
                v, separators=(",", ":"), default=str)
        return row


def _join(xs) -> str:
    return "" if xs is None else " ".join(str(int(x)) for x in xs)


def write_selections_csv(selections: Sequence[Selection], path, provenance_record: dict | None = None):
    """Atomically write ``[s.to_row() for s in selections]`` as CSV (columns = union, in first-seen order); with a
    provenance record also its sidecar ``<path>.json``."""
    rows = [s.to_row() for s in selections]
    cols = list(OrderedDict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    out = atomic_write_text(path, buf.getvalue())
    if provenance_record is not None:
        write_sidecar(out, provenance_record)
    return out


# --------------------------------------------------------------------------------------------------- helpers
@dataclass
class _Batch:
    ids: torch.Tensor  # (B, T) long, right-padded
    attention_mask: torch.Tensor | None  # (B, T) or None for a single sample
    valid: torch.Tensor  # (B, T) bool: real tokens
    count: torch.Tensor  # (B, T) bool: tokens whose prediction counts in the NLL (position 0 is never predicted)


def _samples(calibration) -> list[dict]:
    samples = list(calibration)
    if not samples:
        raise ValueError("the calibration set is empty")
    return samples


def _describe(calibration) -> dict:
    if isinstance(calibration, CalibrationSet):
        return calibration.describe()
    samples = list(calibration)
    return {"samples": len(samples), "tokens": int(sum(s["input_ids"].numel() for s in samples))}


def _make_batches(model, calibration, batch_size: int = 1, response_only: bool = False,
                  pad_token_id: int | None = None) -> list[_Batch]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    samples = _samples(calibration)
    dev = model_device(model)
    pad = pad_token_id if pad_token_id is not None else (getattr(model.config, "pad_token_id", None) or 0)
    out = []
    for i in range(0, len(samples), batch_size):
        idx = list(range(i, min(len(samples), i + batch_size)))
        ids, att, msk = _collate(samples, idx, dev, pad, response_only)
        valid = att.bool() if att is not None else torch.ones_like(ids, dtype=torch.bool)
        out.append(_Batch(ids, att, valid, msk & valid))
    return out


def _check_M(N: int, M: int) -> int:
    if not isinstance(M, int) or isinstance(M, bool) or M < 1 or M > N - 1:
        raise ValueError(f"M must be an integer between 1 and {N - 1} (the model has {N} blocks), got {M!r}")
    return M


def _layers(model):
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    return adapter, layers, len(layers)


def _feasible(model, removed: Iterable[int]) -> bool:
    """False when ``removed`` takes out every attention block of a hybrid model (check_removal would refuse)."""
    adapter = get_adapter(model)
    if not adapter.hybrid:
        return True
    types = adapter.block_types(model)
    att = [i for i, t in enumerate(types) if t == ATTENTION]
    return not att or bool(set(att) - set(removed))


def _pick_lowest(model, scores: Sequence[float], M: int, candidates: Iterable[int]) -> list[int]:
    """The M lowest-scoring candidates (ties → lower index), passing over any block that would remove the last
    attention block of a hybrid model."""
    chosen: list[int] = []
    for i in sorted(candidates, key=lambda i: (scores[i], i)):
        if len(chosen) == M:
            break
        if math.isfinite(scores[i]) and _feasible(model, chosen + [i]):
            chosen.append(i)
    if len(chosen) < M:
        raise ValueError(f"only {len(chosen)} blocks can be removed under this method's restrictions, M = {M} asked")
    return sorted(chosen)


def _to_list(x: torch.Tensor | Sequence[float], allowed: Iterable[int] | None = None) -> list[float | None]:
    vals = [float(v) for v in x]
    if allowed is None:
        return vals
    keep = set(allowed)
    return [v if i in keep else None for i, v in enumerate(vals)]


def _meta(model, **kw) -> dict[str, Any]:
    _, _, N = _layers(model)
    return {"model": getattr(model.config, "_name_or_path", None) or type(model).__name__, "N": N, **kw}


def _out_tensor(output):
    return output[0] if isinstance(output, tuple) else output


class _Taps:
    """Forward pre-hooks (block input, optionally the exact args/kwargs the model passes) and forward hooks (block
    output) on every block. After a forward pass, ``inputs[i]``/``outputs[i]`` hold block i's input/output."""

    def __init__(self, layers: nn.ModuleList, keep_kwargs: bool = False, outputs: bool = True):
        self.layers, self.keep_kwargs, self.want_outputs = layers, keep_kwargs, outputs
        self.handles: list = []
        n = len(layers)
        self.inputs: list = [None] * n
        self.outputs: list = [None] * n
        self.kwargs: list = [None] * n

    def __enter__(self) -> _Taps:
        for i, block in enumerate(self.layers):
            self.handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            if self.want_outputs:
                self.handles.append(block.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            if args:
                h, rest = args[0], tuple(args[1:])
            else:
                h, rest = kwargs["hidden_states"], ()
            self.inputs[i] = h.detach()
            if self.keep_kwargs:
                self.kwargs[i] = (rest, {k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            self.outputs[i] = _out_tensor(output).detach()

        return hook


def _call_block(block: nn.Module, h: torch.Tensor, kw) -> torch.Tensor:
    args, kwargs = kw
    return _out_tensor(block(h, *args, **kwargs))


def _final_norm(model) -> nn.Module | None:
    """The norm between the last block and the LM head (``model.model.norm``, Nemotron-H's ``norm_f``, ...)."""
    adapter = get_adapter(model)
    parent_path = adapter.layers_path.rpartition(".")[0]
    base = _get_path(model, parent_path) if parent_path else model
    for name in ("norm", "norm_f", "final_layernorm", "ln_f"):
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def _forward(model, b: _Batch):
    return model(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False)


def _forward_base(model, b: _Batch) -> None:
    """Run the blocks (and the final norm) without the LM head, for passes that only read hooks."""
    parent_path = get_adapter(model).layers_path.rpartition(".")[0]
    base = _get_path(model, parent_path) if parent_path else model
    base(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False)


def _nll_sum(logits: torch.Tensor, b: _Batch) -> tuple[float, int]:
    """Σ next-token NLL over counted positions (float64) and their number."""
    logits = logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    target = b.ids[:, 1:].to(logits.device)
    c = b.count[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return float((nll.double() * c).sum()), int(c.sum())


def _timed(fn: Callable[[], Selection]) -> Selection:
    t0 = time.perf_counter()
    sel = fn()
    sel.seconds = time.perf_counter() - t0
    return sel


# --------------------------------------------------------------------------------- hook-based block statistics
@torch.no_grad()
def block_statistics(model, calibration, batch_size: int = 1, removed: Iterable[int] = (),
                     pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """One pass over the calibration set with hooks on every block (gated with α = 0 on ``removed``).

    Returns ``bi`` (N,) = 1 − mean_tokens cos(x_i, y_i); ``norm_ratio`` (N,) = mean_tokens ‖y_i‖/‖x_i‖ (float64,
    means over all real tokens); ``last_states`` (m, N+1, H) float32 = each sample's last real token at the input
    of blocks 0..N−1 and at the output of block N−1 (x^0..x^N); ``tokens`` = number of tokens averaged over.
    Removed (gated) blocks have BI 0 and ratio 1.
    """
    adapter, layers, N = _layers(model)
    removed = list(removed)
    batches = _make_batches(model, calibration, batch_size, pad_token_id=pad_token_id)
    cos_sum = torch.zeros(N, dtype=torch.float64)
    ratio_sum = torch.zeros(N, dtype=torch.float64)
    tokens = 0
    last = []
    gates = Gates(model, adapter=adapter) if removed else None
    try:
        if gates:
            gates.attach()
            gates.alpha = torch.ones(N)
            gates.alpha[removed] = 0.0
        with _Taps(layers) as taps:
            for b in batches:
                _forward_base(model, b)
                valid = b.valid
                rows = torch.arange(b.ids.shape[0], device=valid.device)
                last_idx = valid.sum(1) - 1
                states = []
                for i in range(N):
                    x, y = taps.inputs[i].float(), taps.outputs[i].float()
                    v = valid.to(x.device)
                    cos = F.cosine_similarity(x, y, dim=-1, eps=1e-12)
                    ratio = y.norm(dim=-1) / x.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
                    cos_sum[i] += cos[v].double().sum().cpu()
                    ratio_sum[i] += ratio[v].double().sum().cpu()
                    states.append(x[rows.to(x.device), last_idx.to(x.device)].cpu())
                y = taps.outputs[N - 1].float()
                states.append(y[rows.to(y.device), last_idx.to(y.device)].cpu())
                last.append(torch.stack(states, 1))
                tokens += int(valid.sum())
    finally:
        if gates:
            gates.detach()
    return {"bi": 1.0 - cos_sum / tokens, "norm_ratio": ratio_sum / tokens, "last_states": torch.cat(last, 0),
            "tokens": tokens}


def block_influence(model, calibration, M: int, iterative: bool = False, batch_size: int = 1) -> Selection:
    """ShortGPT's Block Influence. One shot: remove the M lowest BI. ``iterative=True`` (the paper's BI): remove the
    lowest, recompute BI on the shrunken (gated) model, repeat M times; ``relative`` records each step's index in
    the model of that step (block i − number of already-removed blocks below i)."""

    def run():
        _, _, N = _layers(model)
        _check_M(N, M)
        stats = block_statistics(model, calibration, batch_size)
        first = stats["bi"].tolist()
        if not iterative:
            removed = _pick_lowest(model, first, M, range(N))
            order = sorted(removed, key=lambda i: (first[i], i))
            return Selection("block_influence", M, removed, order=order, scores=first,
                             calibration=_describe(calibration), meta=_meta(model, batch_size=batch_size))
        removed: list[int] = []
        relative: list[int] = []
        bi = first
        for step in range(M):
            if step:
                bi = block_statistics(model, calibration, batch_size, removed=removed)["bi"].tolist()
            cands = [i for i in range(N) if i not in removed and _feasible(model, removed + [i])]
            if not cands:
                raise ValueError(f"no block can be removed at step {step + 1} without removing every attention block")
            best = min(cands, key=lambda i: (bi[i], i))
            relative.append(best - sum(1 for r in removed if r < best))
            removed.append(best)
            log.info("iterative BI step %d/%d: remove block %d (BI %.5f)", step + 1, M, best, bi[best])
        return Selection("block_influence_iterative", M, removed, order=list(removed), relative=relative,
                         scores=first, calibration=_describe(calibration), meta=_meta(model, batch_size=batch_size))

    return _timed(run)


def norm_ratio(model, calibration, M: int, batch_size: int = 1) -> Selection:
    """Remove the M blocks with the lowest mean_tokens ‖h_out‖/‖h_in‖ (one shot; the paper's norm-ratio baseline)."""

    def run():
        _, _, N = _layers(model)
        _check_M(N, M)
        scores = block_statistics(model, calibration, batch_size)["norm_ratio"].tolist()
        removed = _pick_lowest(model, scores, M, range(N))
        return Selection("norm_ratio", M, removed, order=sorted(removed, key=lambda i: (scores[i], i)),
                         scores=scores, calibration=_describe(calibration), meta=_meta(model, batch_size=batch_size))

    return _timed(run)


def angular_distances(last_states: torch.Tensor, M: int) -> torch.Tensor:
    """D(ℓ) for ℓ = 0..N−M from ``last_states`` (m, N+1, H): mean over samples of (1/π)·arccos cos(x^ℓ, x^{ℓ+M})."""
    x = last_states.double()
    N = x.shape[1] - 1
    cos = F.cosine_similarity(x[:, : N - M + 1], x[:, M:], dim=-1, eps=1e-12).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean(0)


def angular_distance(model, calibration, M: int, batch_size: int = 1) -> Selection:
    """Gromov et al. (PruneMe): remove the contiguous run [ℓ*, ℓ*+M) with ℓ* = argmin_ℓ D(ℓ), D on the last real
    token of each sample; x^ℓ = input of block ℓ, x^N = output of the last block (hooks, before the final norm).
    On hybrids, runs that would take out every attention block are passed over."""

    def run():
        _, _, N = _layers(model)
        _check_M(N, M)
        D = angular_distances(block_statistics(model, calibration, batch_size)["last_states"], M).tolist()
        starts = [s for s in range(N - M + 1) if _feasible(model, range(s, s + M))]
        if not starts:
            raise ValueError(f"every run of {M} consecutive blocks contains every attention block")
        best = min(starts, key=lambda s: (D[s], s))
        return Selection("angular_distance", M, list(range(best, best + M)), scores=D,
                         calibration=_describe(calibration),
                         meta=_meta(model, batch_size=batch_size, start=best, distance=D[best],
                                    scores_are="D(l) for l = 0..N-M"))

    return _timed(run)


def tail(model, calibration=None, M: int = 1) -> Selection:
    """The last M blocks before the final one: [N−1−M, N−1). ``calibration`` is not used (kept for the common
    signature)."""

    def run():
        _, _, N = _layers(model)
        _check_M(N, M)
        if M > N - 1:
            raise ValueError(f"tail keeps the last block: M can be at most {N - 1}")
        removed = check_removal(model, range(N - 1 - M, N - 1))
        return Selection("tail", M, removed, calibration=None if calibration is None else _describe(calibration),
                         meta=_meta(model))

    return _timed(run)


# ------------------------------------------------------------------------- calibration NLL with a prefix cache
class _RemovalLoss:
    """Calibration NLL (token-weighted mean) of the gated model with ``removed`` ∪ {i} taken out, for candidates i.

    Plain mode: one gated full forward per candidate. Prefix-cache mode: one gated forward of the current model
    (α = 0 on ``removed``) records, for every sample, the hidden state entering every block and the exact
    positional/keyword arguments the model passes to each block (position embeddings, the per-layer attention
    mask, ...). Candidate i then starts from the cached input of block i and runs only the kept blocks after i,
    then the final norm and the LM head. Blocks before i are never recomputed. Removed blocks are skipped, which is
    bitwise what α = 0 does (h + 0·f(h) = h). The cache is validated once against a full forward (replaying every
    block from the embeddings must reproduce the logits); on a mismatch it is switched off with a warning.
    """

    def __init__(self, model, batches: list[_Batch], prefix_cache: bool = True):
        self.model, self.batches = model, batches
        self.adapter, self.layers, self.N = _layers(model)
        self.removed: list[int] = []
        self.gates = Gates(model, adapter=self.adapter)
        self.norm = _final_norm(model)
        self.head = model.get_output_embeddings()
        self.use_cache = prefix_cache
        self.cache_status = "on" if prefix_cache else "off (asked)"
        if prefix_cache and (self.norm is None or self.head is None):
            self.use_cache, self.cache_status = False, "off: final norm or LM head not found"
        self.inputs: list[list[torch.Tensor]] = []
        self.kwargs: list[list] = []
        self.block_calls = 0  # block forward passes spent (a full forward counts N)
        self._validated = False

    def __enter__(self) -> _RemovalLoss:
        self.gates.attach()
        self._set_alpha(self.removed)
        return self

    def __exit__(self, *exc) -> None:
        self.gates.detach()
        self.inputs, self.kwargs = [], []

    def _set_alpha(self, removed: Sequence[int]) -> None:
        a = torch.ones(self.N)
        a[list(removed)] = 0.0
        self.gates.alpha = a

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    @torch.no_grad()
    def set_removed(self, removed: Sequence[int]) -> None:
        """Make ``removed`` the current model; with the cache, only blocks after a newly removed block rerun."""
        removed = list(removed)
        old = self.removed
        self.removed = removed
        self._set_alpha(removed)
        if not self.use_cache:
            return
        new = set(removed) - set(old)
        if self.inputs and set(old) <= set(removed) and len(new) == 1:
            (k,) = new
            rset = set(removed)
            for b in range(len(self.batches)):
                h = self.inputs[b][k]
                for j in range(k + 1, self.N):
                    self.inputs[b][j] = h
                    if j not in rset:
                        h = _call_block(self.layers[j], h, self.kwargs[b][j])
                        self.block_calls += 1
            return
        self._build()

    def _build(self) -> None:
        self.inputs, self.kwargs = [], []
        with _Taps(self.layers, keep_kwargs=True, outputs=False) as taps:
            for bi, b in enumerate(self.batches):
                logits = _forward(self.model, b).logits
                self.block_calls += self.N
                self.inputs.append(list(taps.inputs))
                self.kwargs.append(list(taps.kwargs))
                if not self._validated and bi == 0:
                    self._validate(logits)
                    if not self.use_cache:
                        self.inputs, self.kwargs = [], []
                        return

    def _validate(self, logits: torch.Tensor) -> None:
        self._validated = True
        h = self.inputs[0][0]
        rset = set(self.removed)
        for j in range(self.N):
            if j not in rset:
                h = _call_block(self.layers[j], h, self.kwargs[0][j])
        replay = self._logits(h).float()
        ref = logits.float()
        err = float((replay - ref).abs().max())
        tol = 1e-4 * (1.0 + float(ref.abs().max()))
        if not math.isfinite(err) or err > tol:
            log.warning("prefix cache disabled for %s: replaying the blocks differs from the full forward by %.3g",
                        type(self.model).__name__, err)
            self.use_cache = False
            self.cache_status = f"off: replay mismatch {err:.3g} > {tol:.3g}"

    @torch.no_grad()
    def nll(self, extra: int | None = None) -> float:
        """Token-weighted mean NLL with ``removed`` ∪ {extra} removed (``extra=None``: the current model)."""
        total, count = 0.0, 0
        if not self.use_cache or extra is None:
            self._set_alpha(self.removed + ([] if extra is None else [extra]))
            try:
                for b in self.batches:
                    s, c = _nll_sum(_forward(self.model, b).logits, b)
                    total, count = total + s, count + c
                    self.block_calls += self.N
            finally:
                self._set_alpha(self.removed)
            return total / count
        skip = set(self.removed) | {extra}
        for bi, b in enumerate(self.batches):
            h = self.inputs[bi][extra]
            for j in range(extra + 1, self.N):
                if j not in skip:
                    h = _call_block(self.layers[j], h, self.kwargs[bi][j])
                    self.block_calls += 1
            s, c = _nll_sum(self._logits(h), b)
            total, count = total + s, count + c
        return total / count


@torch.no_grad()
def calibration_nll(model, calibration, removed: Iterable[int] = (), batch_size: int = 1,
                    response_only: bool = False) -> float:
    """Token-weighted mean next-token NLL of ``model`` on the calibration set, gated with α = 0 on ``removed``."""
    batches = _make_batches(model, calibration, batch_size, response_only)
    with _RemovalLoss(model, batches, prefix_cache=False) as ev:
        ev.set_removed(list(removed))
        return ev.nll()


def one_shot_perplexity(model, calibration, M: int, batch_size: int = 1, response_only: bool = False,
                        prefix_cache: bool = True) -> Selection:
    """Shortened LLaMA's "PPL" criterion: I_i = calibration perplexity with only block i removed (gated); remove the
    M lowest. Scores are perplexities. Uses the dense model's prefix cache (see :func:`sleb`)."""

    def run():
        _, _, N = _layers(model)
        _check_M(N, M)
        batches = _make_batches(model, calibration, batch_size, response_only)
        with _RemovalLoss(model, batches, prefix_cache) as ev:
            ev.set_removed([])
            ppl = [math.exp(ev.nll(i)) if _feasible(model, [i]) else math.inf for i in range(N)]
            status, calls = ev.cache_status, ev.block_calls
        removed = _pick_lowest(model, ppl, M, range(N))
        return Selection("one_shot_perplexity", M, removed, order=sorted(removed, key=lambda i: (ppl[i], i)),
                         scores=[p if math.isfinite(p) else None for p in ppl], calibration=_describe(calibration),
                         meta=_meta(model, batch_size=batch_size, response_only=response_only, prefix_cache=status,
                                    block_calls=calls))

    return _timed(run)


def sleb(model, calibration, M: int, batch_size: int = 1, response_only: bool = False, prefix_cache: bool = True,
         exclude: Iterable[int] | None = None) -> Selection:
    """SLEB (Song et al. 2024): for t = 1..M remove the block whose removal, given those already removed, gives the
    lowest calibration NLL. The first and last blocks are never removed (``exclude`` adds more).

    ``prefix_cache=True`` (default) runs each candidate from the cached input of its block (see
    :class:`_RemovalLoss`): candidate i costs the N−1−i blocks after it instead of N, and after a choice only the
    blocks above it are recomputed. It works for every adapter whose blocks can be replayed with the arguments the
    model passed them (checked once per run; otherwise it falls back to gated full forwards and says so in
    ``meta["prefix_cache"]``). It chooses exactly what ``prefix_cache=False`` (one gated full forward per candidate)
    chooses. The cache holds N hidden states per calibration token (N·tokens·hidden·bytes: 0.28 GB for SmolLM2 with
    16 × 256 tokens, tens of GB for an 8B model with 2,048 long conversations: then use ``prefix_cache=False``).
    ``scores`` = first-step NLL per candidate; ``meta["step_nll"]`` = the NLL after each removal;
    ``meta["block_calls"]`` = block forward passes spent (a full forward counts N).
    """

    def run():
        _, _, N = _layers(model)
        _check_M(N, M)
        banned = {0, N - 1} | set(exclude or ())
        batches = _make_batches(model, calibration, batch_size, response_only)
        removed: list[int] = []
        step_nll: list[float] = []
        first: list[float | None] = [None] * N
        with _RemovalLoss(model, batches, prefix_cache) as ev:
            ev.set_removed([])
            for step in range(M):
                cands = [i for i in range(N) if i not in banned and i not in removed
                         and _feasible(model, removed + [i])]
                if not cands:
                    raise ValueError(f"SLEB has no candidate block left at step {step + 1} (first/last block and "
                                     "the last attention block of a hybrid are never removed)")
                nll = {i: ev.nll(i) for i in cands}
                if step == 0:
                    for i, v in nll.items():
                        first[i] = v
                best = min(cands, key=lambda i: (nll[i], i))
                removed.append(best)
                step_nll.append(nll[best])
                log.info("SLEB step %d/%d: remove block %d (calibration NLL %.5f)", step + 1, M, best, nll[best])
                if step < M - 1:
                    ev.set_removed(removed)
            status, calls = ev.cache_status, ev.block_calls
        return Selection("sleb", M, removed, order=list(removed), scores=first, calibration=_describe(calibration),
                         meta=_meta(model, batch_size=batch_size, response_only=response_only, prefix_cache=status,
                                    block_calls=calls, step_nll=step_nll))

    return _timed(run)


# -------------------------------------------------------------------------------------------------- Taylor+
def _block_matrices(block: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in block.named_parameters() if p.dim() >= 2]


def taylor_scores(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Σ_rows |Σ_cols W ⊙ G| of one weight tensor (float64). The last dimension is the column (input) dimension,
    every other dimension a row: (out, in) Linear weights, (experts, out, in) stacked experts, (channels, 1, k) convs.
    """
    return (W.double() * G.double()).sum(-1).abs().sum()


def taylor_plus(model, calibration, M: int, batch_size: int = 1, response_only: bool = False, keep_first: int = 4,
                keep_last: int = 2) -> Selection:
    """Shortened LLaMA's Taylor+: I_i = Σ_{W in block i} Σ_rows |Σ_cols W ⊙ ∂L/∂W| with L = CBO's calibration loss
    (mean over samples of the per-sample mean NLL); every parameter of a block with ≥ 2 dimensions is a "weight
    matrix" (norm weights and biases are not). The first ``keep_first`` (4) and last ``keep_last`` (2) blocks are
    never removed (the "+"); remove the M lowest. ``requires_grad`` and any existing ``.grad`` of every parameter
    are restored afterwards; the model is put in eval mode for the pass and restored."""

    def run():
        adapter, layers, N = _layers(model)
        _check_M(N, M)
        eligible = list(range(keep_first, N - keep_last))
        if len(eligible) < M:
            raise ValueError(f"Taylor+ may only remove blocks {keep_first}..{N - keep_last - 1} "
                             f"({len(eligible)} blocks); M = {M} is too many")
        batches = _make_batches(model, calibration, batch_size, response_only)
        m = sum(b.ids.shape[0] for b in batches)
        saved = {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()}
        was_training = model.training
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            mats = [_block_matrices(b) for b in layers]
            for lst in mats:
                for _, p in lst:
                    p.requires_grad_(True)
            with torch.enable_grad():
                for b in batches:
                    loss = sample_loss(model, b.ids, b.count, b.attention_mask).sum() / m
                    loss.backward()
            scores = [float(sum(taylor_scores(p.detach(), p.grad) for _, p in lst if p.grad is not None))
                      for lst in mats]
        finally:
            for n, p in model.named_parameters():
                rg, g = saved[n]
                p.grad = g
                p.requires_grad_(rg)
            model.train(was_training)
        removed = _pick_lowest(model, scores, M, eligible)
        return Selection("taylor_plus", M, removed, order=sorted(removed, key=lambda i: (scores[i], i)),
                         scores=scores, calibration=_describe(calibration),
                         meta=_meta(model, batch_size=batch_size, response_only=response_only,
                                    keep_first=keep_first, keep_last=keep_last))

    return _timed(run)


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


class _SWMEvaluator:
    """cos(final hidden merged vs original) for a set of merge windows, memoised, with a prefix cache: merges only
    touch blocks ≥ the lowest window start, so each evaluation starts from the original model's cached input of
    that block."""

    def __init__(self, model, batches: list[_Batch]):
        self.model, self.batches = model, batches
        _, self.layers, self.N = _layers(model)
        self.norm = _final_norm(model)
        if self.norm is None:
            raise ValueError("SWM needs the model's final norm (model.model.norm or norm_f); none was found")
        self.inputs, self.kwargs, self.ref = [], [], []
        self.memo: dict[tuple, float] = {}
        self.merged: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self.block_calls = 0
        with torch.no_grad(), _Taps(self.layers, keep_kwargs=True, outputs=True) as taps:
            for b in batches:
                _forward_base(model, b)
                self.block_calls += self.N
                self.inputs.append(list(taps.inputs))
                self.kwargs.append(list(taps.kwargs))
                self.ref.append(self.norm(taps.outputs[self.N - 1]).float())
        self.tokens = int(sum(int(b.valid.sum()) for b in batches))

    def _merged(self, a: int, b: int) -> dict:
        key = (a, b)
        if key in self.merged:
            self.merged.move_to_end(key)
        else:
            self.merged[key] = merged_parameters(self.layers, a, b)
            while len(self.merged) > 8:
                self.merged.popitem(last=False)
        return self.merged[key]

    @torch.no_grad()
    def similarity(self, windows: Iterable[tuple[int, int]]) -> float:
        key = tuple(sorted((int(a), int(b)) for a, b in windows))
        if key in self.memo:
            return self.memo[key]
        if not key:
            return 1.0
        starts = {a: b for a, b in key}
        lo = key[0][0]
        total = 0.0
        for bi, batch in enumerate(self.batches):
            h = self.inputs[bi][lo]
            j = lo
            while j < self.N:
                if j in starts:
                    args, kw = self.kwargs[bi][j]
                    h = _out_tensor(torch.func.functional_call(self.layers[j], self._merged(j, starts[j]),
                                                               (h, *args), kw))
                    j = starts[j] + 1
                else:
                    h = _call_block(self.layers[j], h, self.kwargs[bi][j])
                    j += 1
                self.block_calls += 1
            cos = F.cosine_similarity(self.norm(h).float(), self.ref[bi], dim=-1, eps=1e-12)
            total += float(cos[batch.valid.to(cos.device)].double().sum())
        self.memo[key] = total / self.tokens
        return self.memo[key]


def _swm_run(ev: _SWMEvaluator, threshold: float, M: int, lowest: int) -> tuple[list[tuple[int, int]], bool]:
    """One top-down sliding-window pass at ``threshold``; never removes more than M blocks. Returns the committed
    windows (low, high) in commit order and whether the M cap refused a growth that the threshold would have
    judged."""
    windows: list[tuple[int, int]] = []
    removed, capped = 0, False
    high = ev.N - 1
    while high > lowest and removed < M:
        low = high
        while low - 1 >= lowest:
            if removed + (high - low + 1) > M:  # extending would remove one more block than allowed
                capped = True
                break
            if ev.similarity(windows + [(low - 1, high)]) > threshold:
                low -= 1
            else:
                break
        if low < high:
            windows.append((low, high))
            removed += high - low
        high = low - 1
    return windows, capped


def sliding_window_merging(model, calibration, M: int, threshold: float | None = None, batch_size: int = 1,
                           lowest: int = 0, tolerance: float = 1e-4, max_steps: int = 40) -> Selection:
    """The paper's sliding-window merging (SWM, after Ding et al. 2025). What is implemented, exactly:

    - A window [low, high] starts at the top (high = N−1, low = high) and tries to grow downward: the candidate
      model merges blocks low−1..high into block low−1 and drops the others; the growth is kept while
      s = cos(final hidden merged, final hidden original) > threshold, with the final hidden state = the final-norm
      output that the LM head reads, cos averaged over all real calibration tokens. When growing fails (or block
      ``lowest`` is reached) the window is committed if it holds ≥ 2 blocks, and the next window starts at the
      block that failed to join (high = low − 1). Earlier commits stay in the model when later windows are scored.
    - Merge rule (the description "W_low += W_cur − W_low" read as accumulating differences against the ORIGINAL
      lower block, as in Ding et al.): θ_merged = θ_low + Σ_{k=low+1}^{high} (θ_k − θ_low), for every parameter of
      the block (norm weights included); applied literally in sequence it would just copy the top block.
    - The merged block keeps block low's position, attention type and per-layer arguments.
    - Exactly M: a pass never removes more than M blocks (a growth that would exceed M ends the window). With
      ``threshold=None`` the threshold is bisected in [−1, 1] for the HIGHEST threshold whose pass removes M blocks
      (bracket width ``tolerance``, at most ``max_steps`` passes): low thresholds merge more. If the count jumps
      past M at the critical threshold, the M cap decides the last window (``meta["capped"]``). With a given
      ``threshold`` one pass runs, removing at most M.
    - Hybrid models are refused: consecutive Nemotron-H layers are different mixers whose weights cannot be added.

    ``meta``: windows (merged into their first block), threshold, threshold_fails (the bracket's upper end),
    similarity of the final model, evaluations (distinct merged models scored), passes.
    """

    def run():
        adapter, layers, N = _layers(model)
        _check_M(N, M)
        if adapter.hybrid:
            raise ValueError("sliding-window merging adds the weights of consecutive blocks; the blocks of a hybrid "
                             f"model ({adapter.name}) are different mixers (Mamba2, MoE, attention) that cannot be "
                             "merged. Use block_influence, norm_ratio, sleb or one_shot_perplexity instead.")
        shapes = [{n: tuple(p.shape) for n, p in b.named_parameters()} for b in layers]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("sliding-window merging needs blocks with identical parameters (names and shapes)")
        if not 0 <= lowest < N - 1:
            raise ValueError(f"lowest must be in 0..{N - 2}, got {lowest}")
        if M > N - 1 - lowest:
            raise ValueError(f"with lowest = {lowest} at most {N - 1 - lowest} blocks can be merged away; M = {M}")
        batches = _make_batches(model, calibration, batch_size)
        ev = _SWMEvaluator(model, batches)
        passes = 0

        def count(t):
            nonlocal passes
            passes += 1
            w, capped = _swm_run(ev, t, M, lowest)
            log.info("SWM pass %d: threshold %.6f removes %d (%d merged models scored)", passes, t,
                     sum(b - a for a, b in w), len(ev.memo))
            return w, capped, sum(b - a for a, b in w)

        if threshold is not None:
            windows, capped, n = count(threshold)
            t_ok, t_fail = float(threshold), None
        else:
            lo, hi = -1.0, 1.0
            windows, capped, n = count(lo)
            if n != M:
                raise RuntimeError(f"SWM could not reach M = {M} even at threshold -1 (got {n})")
            best = (windows, capped)
            steps = 0
            while hi - lo > tolerance and steps < max_steps:
                mid = (lo + hi) / 2
                w, c, k = count(mid)
                steps += 1
                if k == M:
                    lo, best = mid, (w, c)
                else:
                    hi = mid
            windows, capped = best
            t_ok, t_fail = lo, hi
        removed = sorted(k for a, b in windows for k in range(a + 1, b + 1))
        order = [k for a, b in windows for k in range(b, a, -1)]
        sim = ev.similarity(windows)
        return Selection("sliding_window_merging", M, removed, order=order, calibration=_describe(calibration),
                         meta=_meta(model, batch_size=batch_size, windows=[[a, b] for a, b in windows],
                                    threshold=t_ok, threshold_fails=t_fail, similarity=sim, capped=capped,
                                    reached_M=len(removed) == M, evaluations=len(ev.memo), passes=passes,
                                    block_calls=ev.block_calls, lowest=lowest,
                                    merge_rule="theta_low + sum_{k=low+1..high}(theta_k - theta_low)"))

    return _timed(run)


@torch.no_grad()
def build_swm_model(model, selection: Selection) -> nn.Module:
    """A merged, physically shortened COPY of ``model`` for an SWM ``selection``: block ``low`` of every window gets
    :func:`merged_parameters` (weights changed), blocks low+1..high are removed (:func:`remove_blocks`, which
    renumbers and rewrites the config); ``config.cbo_merged_windows`` records the windows. ``model`` is untouched."""
    windows = selection.meta.get("windows")
    if not windows:
        raise ValueError("this selection has no merge windows (meta['windows']); build it with "
                         "sliding_window_merging")
    removed = sorted(k for a, b in windows for k in range(a + 1, b + 1))
    if removed != list(selection.removed):
        raise ValueError(f"the selection's windows {windows} remove {removed}, not {selection.removed}")
    _, layers, _ = _layers(model)
    new = copy.deepcopy(model)
    _, new_layers, _ = _layers(new)
    for a, b in windows:
        merged = merged_parameters(layers, a, b)
        for name, p in new_layers[a].named_parameters():
            p.copy_(merged[name])
    remove_blocks(new, removed)
    new.config.cbo_merged_windows = [[int(a), int(b)] for a, b in windows]
    return new


# --------------------------------------------------------------------------------------------------- random
def random_selection(N_or_model, M: int, seed: int = 0) -> Selection:
    """A uniform M-subset of the N blocks (``random.Random(seed)``). Given a hybrid model, subsets that remove every
    attention block are redrawn (uniform over the feasible subsets)."""
    t0 = time.perf_counter()
    model = None if isinstance(N_or_model, int) else N_or_model
    N = N_or_model if model is None else _layers(model)[2]
    _check_M(N, M)
    rng = random.Random(seed)
    for _ in range(10_000):
        removed = sorted(rng.sample(range(N), M))
        if model is None or _feasible(model, removed):
            break
    else:
        raise ValueError("no feasible random subset found in 10,000 draws")
    meta = _meta(model, seed=seed) if model is not None else {"N": N, "seed": seed}
    return Selection("random", M, removed, seconds=time.perf_counter() - t0, meta=meta)


def random_selections(N_or_model, M: int, seeds: Iterable[int] = range(5)) -> list[Selection]:
    """:func:`random_selection` for each seed."""
    return [random_selection(N_or_model, M, seed) for seed in seeds]


# ------------------------------------------------------------------------------------------------- registry
def _bi_iterative(model, calibration, M, **kw):
    return block_influence(model, calibration, M, iterative=True, **kw)


def _random(model, calibration, M, seed: int = 0):
    return random_selection(model, M, seed)


BASELINES: dict[str, Callable[..., Selection]] = {
    "block_influence": block_influence,
    "block_influence_iterative": _bi_iterative,
    "norm_ratio": norm_ratio,
    "angular_distance": angular_distance,
    "tail": tail,
    "one_shot_perplexity": one_shot_perplexity,
    "taylor_plus": taylor_plus,
    "sleb": sleb,
    "sliding_window_merging": sliding_window_merging,
    "random": _random,
}
ALIASES = {"bi": "block_influence", "bi_iterative": "block_influence_iterative", "norm": "norm_ratio",
           "angular": "angular_distance", "ppl": "one_shot_perplexity", "taylor+": "taylor_plus",
           "taylor": "taylor_plus", "swm": "sliding_window_merging"}


def run_baseline(name: str, model, calibration, M: int, **kw) -> Selection:
    """Run the baseline ``name`` (a key of :data:`BASELINES` or an alias: bi, bi-iterative, norm, angular, ppl,
    taylor+, swm); ``kw`` go to the method (``random`` takes ``seed``)."""
    key = str(name).strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)} or an alias "
                         f"({', '.join(f'{a} → {b}' for a, b in sorted(ALIASES.items()))})")
    return BASELINES[key](model, calibration, M, **kw)
