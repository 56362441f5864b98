"""The calibration loss of a model with blocks removed — the measurement every evaluation-based method and the
re-ranking need, in one place: batching of calibration samples (right padding, counted tokens), CBO's loss L (mean
over samples of the per-sample mean NLL), token-weighted NLL, hooks on block inputs/outputs, and
:class:`RemovalLoss` (the gated model's NLL with a candidate removed, optionally from a validated prefix cache).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cbo_utils.model.blocks import Gates, final_norm, get_adapter, get_path, model_layers
from cbo_utils.model.load import model_device

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- helpers
@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) long, right-padded
    attention_mask: torch.Tensor | None  # (B, T) or None for a single sample
    valid: torch.Tensor  # (B, T) bool: real tokens
    count: torch.Tensor  # (B, T) bool: tokens whose prediction counts in the NLL (position 0 is never predicted)


def _samples(calibration) -> list[dict]:
    samples = list(calibration)
    if not samples:
        raise ValueError("the calibration set is empty")
    return samples


def make_batches(model, calibration, batch_size: int = 1, response_only: bool = False,
                  pad_token_id: int | None = None) -> list[Batch]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    samples = _samples(calibration)
    dev = model_device(model)
    pad = pad_token_id if pad_token_id is not None else (getattr(model.config, "pad_token_id", None) or 0)
    out = []
    for i in range(0, len(samples), batch_size):
        idx = list(range(i, min(len(samples), i + batch_size)))
        ids, att, msk = collate_samples(samples, idx, dev, pad, response_only)
        valid = att.bool() if att is not None else torch.ones_like(ids, dtype=torch.bool)
        out.append(Batch(ids, att, valid, msk & valid))
    return out


def block_output(output):
    return output[0] if isinstance(output, tuple) else output


class BlockTaps:
    """Forward pre-hooks (block input, optionally the exact args/kwargs the model passes) and forward hooks (block
    output) on every block. After a forward pass, ``inputs[i]``/``outputs[i]`` hold block i's input/output."""

    def __init__(self, layers: nn.ModuleList, keep_kwargs: bool = False, outputs: bool = True):
        self.layers, self.keep_kwargs, self.want_outputs = layers, keep_kwargs, outputs
        self.handles: list = []
        n = len(layers)
        self.inputs: list = [None] * n
        self.outputs: list = [None] * n
        self.kwargs: list = [None] * n

    def __enter__(self) -> BlockTaps:
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
            self.outputs[i] = block_output(output).detach()

        return hook


def call_block(block: nn.Module, h: torch.Tensor, kw) -> torch.Tensor:
    args, kwargs = kw
    return block_output(block(h, *args, **kwargs))


def replay_blocks(layers: nn.ModuleList, h: torch.Tensor, kwargs: Sequence, start: int,
                  skip: Iterable[int] = ()) -> tuple[torch.Tensor, int]:
    """Run blocks ``start, start + 1, …`` of ``layers`` not in ``skip`` on ``h`` (the recorded input of block
    ``start``), each with its recorded arguments ``kwargs[j]``: the prefix-cache replay of :class:`RemovalLoss` and
    the perplexity window cache. Returns the last hidden state and the number of block passes spent."""
    skip, calls = set(skip), 0
    for j in range(start, len(layers)):
        if j not in skip:
            h = call_block(layers[j], h, kwargs[j])
            calls += 1
    return h, calls


def replay_matches(got: torch.Tensor, ref: torch.Tensor, what: str, model) -> tuple[bool, float, float]:
    """Whether replayed logits ``got`` equal a plain forward's ``ref`` (max |Δ| ≤ 1e-4 · (1 + max |ref|), finite);
    warns naming ``what`` and the model class when they do not. Returns (ok, error, tolerance) — the one check both
    prefix caches run before they are trusted."""
    got, ref = got.float(), ref.float()
    err = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
    tol = 1e-4 * (1.0 + float(ref.abs().max()))
    ok = math.isfinite(err) and err <= tol
    if not ok:
        log.warning("%s off for %s: replaying the blocks differs from the plain forward by %.3g",
                    what, type(model).__name__, err)
    return ok, err, tol


def _forward(model, b: Batch):
    return model(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False)


def forward_blocks(model, b: Batch) -> None:
    """Run the blocks (and the final norm) without the LM head, for passes that only read hooks."""
    parent_path = get_adapter(model).layers_path.rpartition(".")[0]
    base = get_path(model, parent_path) if parent_path else model
    base(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False)


#: vocabulary rows of the LM head per matmul in :func:`head_logsumexp` (the full logits are never materialised:
#: on a 2-core CPU this is 1.7× faster than ``logsumexp(head(h))`` for SmolLM2's 49k vocabulary)
HEAD_CHUNK = 2048


def plain_head(head) -> bool:
    """Whether ``head`` is a plain linear layer (logits = W h + b), which :func:`head_logsumexp` can split."""
    return type(head) is nn.Linear


def head_logsumexp(hn: torch.Tensor, head: nn.Linear, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """``logsumexp(head(hn), -1)`` (float64 result, float32 arithmetic) computed over vocabulary chunks, so the
    (tokens × vocabulary) logits are never held at once; equal to the full computation to float32 rounding."""
    W, bias = head.weight, head.bias
    x = hn.reshape(-1, hn.shape[-1]).to(W.dtype)
    parts = []
    for s in range(0, W.shape[0], chunk):
        z = x @ W[s:s + chunk].T
        if bias is not None:
            z = z + bias[s:s + chunk]
        parts.append(torch.logsumexp(z.float(), -1))
    return torch.logsumexp(torch.stack(parts, -1), -1).double().reshape(hn.shape[:-1])


def head_nll(hn: torch.Tensor, head: nn.Linear, target: torch.Tensor) -> torch.Tensor:
    """Per-position next-token NLL (float64) of the logits ``head(hn)`` for ``target`` (same leading shape), from
    :func:`head_logsumexp` and the target's logit alone."""
    W = head.weight
    zt = (hn.to(W.dtype) * W[target]).sum(-1).float()
    if head.bias is not None:
        zt = zt + head.bias[target].float()
    return head_logsumexp(hn, head) - zt.double()


def _nll_sum_hidden(hn: torch.Tensor, head, b: Batch) -> tuple[float, int]:
    """:func:`_nll_sum` of the logits ``head(hn)``, split over the vocabulary when the head is plain linear."""
    if not plain_head(head):
        return _nll_sum(head(hn), b)
    target = b.ids[:, 1:].to(hn.device)
    c = b.count[:, 1:].to(hn.device)
    nll = head_nll(hn[:, :-1], head, target)
    return float((nll * c).sum()), int(c.sum())


def _nll_sum(logits: torch.Tensor, b: Batch) -> tuple[float, int]:
    """Σ next-token NLL over counted positions (float64) and their number."""
    logits = logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    target = b.ids[:, 1:].to(logits.device)
    c = b.count[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return float((nll.double() * c).sum()), int(c.sum())


# ------------------------------------------------------------------------- calibration NLL with a prefix cache
class RemovalLoss:
    """Calibration NLL (token-weighted mean) of the gated model with ``removed`` ∪ {i} taken out, for candidates i.

    Plain mode: one gated full forward per candidate. Prefix-cache mode: one gated forward of the current model
    (α = 0 on ``removed``) records, for every sample, the hidden state entering every block and the exact
    positional/keyword arguments the model passes to each block (position embeddings, the per-layer attention
    mask, ...). Candidate i then starts from the cached input of block i and runs only the kept blocks after i,
    then the final norm and the LM head. Blocks before i are never recomputed. Removed blocks are skipped, which is
    bitwise what α = 0 does (h + 0·f(h) = h). The cache is validated once against a full forward (replaying every
    block from the embeddings must reproduce the logits); on a mismatch it is switched off with a warning.
    """

    def __init__(self, model, batches: list[Batch], prefix_cache: bool = True):
        self.model, self.batches = model, batches
        self.adapter, self.layers, self.N = model_layers(model)
        self.removed: list[int] = []
        self.gates = Gates(model, adapter=self.adapter)
        self.norm = final_norm(model)
        self.head = model.get_output_embeddings()
        self.use_cache = prefix_cache
        self.cache_status = "on" if prefix_cache else "off (asked)"
        if prefix_cache and (self.norm is None or self.head is None):
            self.use_cache, self.cache_status = False, "off: final norm or LM head not found"
        self.inputs: list[list[torch.Tensor]] = []
        self.kwargs: list[list] = []
        self.block_calls = 0  # block forward passes spent (a full forward counts N)
        self._validated = False

    def __enter__(self) -> RemovalLoss:
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
                        h = call_block(self.layers[j], h, self.kwargs[b][j])
                        self.block_calls += 1
            return
        self._build()

    def _build(self) -> None:
        self.inputs, self.kwargs = [], []
        with BlockTaps(self.layers, keep_kwargs=True, outputs=False) as taps:
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
        h, _ = replay_blocks(self.layers, self.inputs[0][0], self.kwargs[0], 0, self.removed)
        ok, err, tol = replay_matches(self._logits(h), logits, "prefix cache", self.model)
        if not ok:
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
            h, calls = replay_blocks(self.layers, self.inputs[bi][extra], self.kwargs[bi], extra + 1, skip)
            self.block_calls += calls
            s, c = _nll_sum_hidden(self.norm(h), self.head, b)
            total, count = total + s, count + c
        return total / count


@torch.no_grad()
def calibration_nll(model, calibration, removed: Iterable[int] = (), batch_size: int = 1,
                    response_only: bool = False) -> float:
    """Token-weighted mean next-token NLL of ``model`` on the calibration set, gated with α = 0 on ``removed``."""
    batches = make_batches(model, calibration, batch_size, response_only)
    with RemovalLoss(model, batches, prefix_cache=False) as ev:
        ev.set_removed(list(removed))
        return ev.nll()


def sample_loss(model, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy, shape (B,). Counts token t+1 when ``loss_mask[t+1]`` (and the
    attention mask) is set; padding never counts."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    if logits.dtype != torch.float64:
        logits = logits.float()  # the softmax in float32 at least (bf16/fp16 models)
    target = input_ids[:, 1:].to(logits.device)  # a device_map-sharded model returns logits on its last device
    count = torch.ones_like(target, dtype=torch.bool)
    if loss_mask is not None:
        count &= (loss_mask if loss_mask.dim() == 2 else loss_mask[None])[:, 1:].to(count.device)
    if attention_mask is not None:
        count &= attention_mask[:, 1:].bool().to(count.device)
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    n = count.sum(1)
    if (n == 0).any():
        raise ValueError("a calibration sample has no counted tokens (empty response with response-only loss?)")
    return (nll * count).sum(1) / n


def collate_samples(samples, idx, device, pad_id: int, response_only: bool):
    lens = [samples[i]["input_ids"].numel() for i in idx]
    T = max(lens)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(idx), T), dtype=torch.long)
    msk = torch.zeros((len(idx), T), dtype=torch.bool)
    for r, i in enumerate(idx):  # right padding: causal attention keeps real tokens unaffected
        n = lens[r]
        ids[r, :n] = samples[i]["input_ids"]
        att[r, :n] = 1
        msk[r, :n] = samples[i]["loss_mask"] if response_only else True
    single = len(idx) == 1
    return ids.to(device), (None if single else att.to(device)), msk.to(device)
