"""Measured block interactions: the calibration divergence ``D(S)`` of the model with the blocks ``S`` removed, for
every set of one or two blocks — the pair table behind the ``pairs`` energy.

With h_i = D({i}) − D(∅) and J_ij = D({i,j}) − D({i}) − D({j}) + D(∅),

    E(x) = D(∅) + Σ_i h_i x_i + Σ_{i<j} J_ij x_i x_j

is the paper's Ising form with its couplings *measured at the real step* (α: 1 → 0 on the removed blocks) instead
of extrapolated from a second-order expansion at α = 1; it equals D exactly on every set of at most two blocks. One
table serves every M.

``D`` is the mean per-token KL(dense ‖ pruned) by default (from the dense model's log-probabilities, computed once
per batch), or the mean next-token cross-entropy (``objective="ce"``; then D(∅) is the dense model's). All
N + N(N−1)/2 sets are measured with a prefix cache: one dense forward records the input of every block and the
arguments the model passes it; a single removal {i} runs only the blocks after i, and a pair {i, j} starts from the
input of block j in the model without i (recorded on the way) and runs only the blocks after j. The cache is
validated against a full forward on the first batch; on a mismatch every set falls back to a gated forward
(α = 0 on S), which is bitwise what the cache computes when it is valid. The measurement goes batch by batch (the
dense log-probabilities of one batch only are held), is resumable from a checkpoint after every batch, and is saved
as ``pairs.safetensors`` with a provenance sidecar.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from cbo_utils.calibration import CalibrationSet
from cbo_utils.core.artifacts import atomic_write_bytes, provenance, read_json, sidecar_path, write_sidecar
from cbo_utils.model.blocks import Gates, RemovalError, check_removal, final_norm, model_layers, without_blocks
from cbo_utils.model.loss import Batch, BlockTaps, call_block, head_logsumexp, head_nll, make_batches, plain_head

PAIRS_FILE = "pairs.safetensors"

OBJECTIVES = ("kl", "ce")


@dataclass
class PairTable:
    """``D`` on every set of at most two removed blocks (float64): ``base`` = D(∅), ``singles[i]`` = D({i}),
    ``pairs[i, j]`` = D({i, j}) (symmetric; the diagonal holds the singles)."""

    base: float
    singles: np.ndarray
    pairs: np.ndarray
    objective: str = "kl"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def N(self) -> int:
        return int(self.singles.shape[0])

    @property
    def h(self) -> np.ndarray:
        """h_i = D({i}) − D(∅)."""
        return self.singles - self.base

    @property
    def J(self) -> np.ndarray:
        """J_ij = D({i,j}) − D({i}) − D({j}) + D(∅) off the diagonal, 0 on it."""
        J = self.pairs - self.singles[:, None] - self.singles[None, :] + self.base
        np.fill_diagonal(J, 0.0)
        return J

    def quadratic_form(self) -> tuple[np.ndarray, float]:
        """``(Q, const)`` with ``xᵀQx + const`` = D on every set of ≤ 2 blocks (Q = diag(h) + J/2)."""
        Q = self.J / 2.0
        Q[np.diag_indices(self.N)] = self.h
        return Q, float(self.base)

    def divergence(self, removed: Sequence[int]) -> float:
        """The measured D of a set of at most two blocks."""
        s = sorted(int(b) for b in removed)
        if len(s) == 0:
            return float(self.base)
        if len(s) == 1:
            return float(self.singles[s[0]])
        if len(s) == 2:
            return float(self.pairs[s[0], s[1]])
        raise ValueError(f"the pair table holds sets of at most two blocks, not {s}")

    def save(self, path, prov: dict | None = None) -> Path:
        path = Path(path)
        tensors = {"singles": torch.from_numpy(self.singles.copy()), "pairs": torch.from_numpy(self.pairs.copy()),
                   "base": torch.tensor([self.base], dtype=torch.float64)}
        meta = {"objective": self.objective, "meta": json.dumps(self.meta, default=str)}
        atomic_write_bytes(path, save(tensors, metadata=meta))
        write_sidecar(path, prov or provenance("pair_table", {"objective": self.objective}))
        return path


def load_pair_table(path) -> PairTable:
    """A :class:`PairTable` saved by :meth:`PairTable.save`."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in f.keys()}
    return PairTable(float(t["base"][0]), t["singles"].double().numpy(), t["pairs"].double().numpy(),
                     md.get("objective", "kl"), json.loads(md.get("meta", "{}")))


# ------------------------------------------------------------------------------------------------ measuring
class _Divergence:
    """Σ over the counted positions of one batch of the per-token divergence of a candidate, from its logits or —
    for a plain linear LM head — from its final hidden state.

    KL(p ‖ q) per token = Σ_v p log p − Σ_v p z + logsumexp(z) for the candidate's logits z (Σ_v p = 1). The first
    term is the dense model's (computed once, float64); with a linear head z = W h + b the middle term is
    h · (Wᵀp) + b · p, so only the log-sum-exp needs the full vocabulary (float32, max-shifted: accurate to ~1e-6);
    ``ce`` is the next-token cross-entropy.
    """

    def __init__(self, objective: str, dense_logits: torch.Tensor, b: Batch, head=None):
        self.objective = objective
        self.count = b.count[:, 1:].to(dense_logits.device)
        self.target = b.ids[:, 1:].to(dense_logits.device)
        self.tokens = int(self.count.sum())
        self.u = self.pb = None
        if objective == "kl":
            lp = F.log_softmax(dense_logits[:, :-1].double(), -1)
            self.p = lp.exp()
            self.negent = (self.p * lp).sum(-1)
            del lp
            if plain_head(head):
                self.u = self.p @ head.weight.detach().double()          # (B, T, H): Wᵀp per token
                self.pb = self.p @ head.bias.detach().double() if head.bias is not None else 0.0
                self.p = self.p.float()                                  # kept only for the logits path

    @staticmethod
    def _lse(z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        m = z.amax(-1, keepdim=True)
        return (torch.logsumexp(z - m, -1) + m[..., 0]).double()

    def _total(self, per_token: torch.Tensor) -> float:
        return float((per_token * self.count).sum())

    def __call__(self, logits: torch.Tensor) -> float:
        z = logits[:, :-1]
        if self.objective == "ce":
            return self._total(self._lse(z) - z.gather(-1, self.target[..., None])[..., 0].double())
        cross = torch.stack([(self.p[i].double() * z[i].double()).sum(-1) for i in range(z.shape[0])])
        return self._total(self.negent - cross + self._lse(z))

    def from_hidden(self, hn: torch.Tensor, head) -> float:
        """The divergence of the candidate whose normed final hidden state is ``hn`` (``head(hn)`` its logits); for a
        plain linear head the log-sum-exp goes over vocabulary chunks (:func:`head_logsumexp`)."""
        if not plain_head(head):
            return self(head(hn))
        h = hn[:, :-1]
        if self.objective == "ce":
            return self._total(head_nll(h, head, self.target))
        cross = (h.double() * self.u).sum(-1) + self.pb
        return self._total(self.negent - cross + head_logsumexp(h, head))


def _run_key(model, calibration, objective: str, batch_size: int, response_only: bool) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([objective, batch_size, response_only, type(model).__name__]).encode())
    for s in calibration:
        h.update(s["input_ids"].to(torch.int64).numpy().tobytes())
    params = list(model.parameters())
    for p in params[:1] + params[-1:]:
        h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:24]


@torch.no_grad()
def measure_pair_table(model, calibration: CalibrationSet | Sequence[dict], *, objective: str = "kl",
                       batch_size: int = 8, response_only: bool = False, prefix_cache: bool = True,
                       checkpoint=None, progress: bool = True) -> PairTable:
    """Measure D on ∅, every block and every pair of blocks (see the module docstring). ``checkpoint``: a file; the
    sums after each batch are saved there and a rerun with the same model, calibration and options resumes; it is
    deleted at the end."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    samples = list(calibration)
    batches = make_batches(model, samples, batch_size, response_only)
    adapter, layers, N = model_layers(model)
    norm, head = final_norm(model), model.get_output_embeddings()
    use_cache = prefix_cache and norm is not None and head is not None
    cache_status = "on" if use_cache else ("off (asked)" if not prefix_cache else "off: final norm or head not found")
    singles, pairs = np.zeros(N), np.zeros((N, N))
    base, tokens, start = 0.0, 0, 0
    ckpt = Path(checkpoint) if checkpoint else None
    key = _run_key(model, samples, objective, batch_size, response_only)
    if ckpt is not None and ckpt.is_file():
        with safe_open(str(ckpt), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("info", "{}"))
            st = {k: f.get_tensor(k) for k in f.keys()}
        if info.get("key") == key:
            singles, pairs = st["singles"].double().numpy(), st["pairs"].double().numpy()
            base, tokens, start, cache_status = info["base"], info["tokens"], info["batches"], info["cache"]
            use_cache = cache_status == "on"
    n_sets = N + N * (N - 1) // 2
    bar = tqdm(total=len(batches) * n_sets, initial=start * n_sets, desc=f"pair table ({objective})", unit="set",
               disable=not progress)
    t0 = time.perf_counter()
    block_calls = 0
    with Gates(model, adapter=adapter) as gates:
        for bi in range(start, len(batches)):
            b = batches[bi]
            gates.alpha = torch.ones(N)
            with BlockTaps(layers, keep_kwargs=True, outputs=False) as taps:
                dense_logits = model(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False).logits
            D = _Divergence(objective, dense_logits, b, head)
            base += D(dense_logits) if objective == "ce" else 0.0
            tokens += D.tokens
            inputs, kwargs = list(taps.inputs), list(taps.kwargs)
            if use_cache and bi == start and start == 0:
                use_cache, cache_status = _validate(layers, norm, head, inputs, kwargs, dense_logits)
            if use_cache:
                block_calls += _pairs_from_cache(layers, norm, head, inputs, kwargs, D, singles, pairs, bar)
            else:
                block_calls += _pairs_gated(model, gates, b, D, singles, pairs, bar)
            del dense_logits, D, inputs, kwargs
            if ckpt is not None and bi + 1 < len(batches):
                info = {"key": key, "base": base, "tokens": tokens, "batches": bi + 1, "cache": cache_status}
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(ckpt, save({"singles": torch.from_numpy(singles), "pairs": torch.from_numpy(pairs)},
                                              metadata={"info": json.dumps(info)}))
    bar.close()
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    singles, pairs, base = singles / tokens, pairs / tokens, base / tokens
    pairs = np.triu(pairs, 1)
    pairs = pairs + pairs.T
    pairs[np.diag_indices(N)] = singles
    meta = {"blocks": N, "samples": len(samples), "tokens": tokens, "objective": objective,
            "batch_size": batch_size, "response_only": response_only, "prefix_cache": cache_status,
            "sets": n_sets, "block_calls": block_calls, "resumed_from_batch": start,
            "seconds": round(time.perf_counter() - t0, 3), "block_types": adapter.block_types(model)}
    if isinstance(calibration, CalibrationSet):
        meta["calibration"] = calibration.describe()
    return PairTable(float(base), singles, pairs, objective, meta)


def _validate(layers, norm, head, inputs, kwargs, dense_logits) -> tuple[bool, str]:
    """Replaying every block from the cached embeddings must reproduce the dense logits."""
    h = inputs[0]
    for j in range(len(layers)):
        h = call_block(layers[j], h, kwargs[j])
    replay, ref = head(norm(h)).float(), dense_logits.float()
    err = float((replay - ref).abs().max())
    tol = 1e-4 * (1.0 + float(ref.abs().max()))
    if not math.isfinite(err) or err > tol:
        return False, f"off: replay mismatch {err:.3g} > {tol:.3g}"
    return True, "on"


def _pairs_from_cache(layers, norm, head, inputs, kwargs, D, singles, pairs, bar) -> int:
    """Add this batch's divergence sums of every single and pair, from the prefix cache; returns block calls."""
    N, calls = len(layers), 0
    for i in range(N):
        h, entering = inputs[i], {}
        for j in range(i + 1, N):   # the model without block i, recording what enters each later block
            entering[j] = h
            h = call_block(layers[j], h, kwargs[j])
            calls += 1
        singles[i] += D.from_hidden(norm(h), head)
        bar.update(1)
        for j in range(i + 1, N):   # then without i and j: from the input of j, skip j
            g = entering[j]
            for k in range(j + 1, N):
                g = call_block(layers[k], g, kwargs[k])
                calls += 1
            pairs[i, j] += D.from_hidden(norm(g), head)
            bar.update(1)
    return calls


def _pairs_gated(model, gates: Gates, b: Batch, D, singles, pairs, bar) -> int:
    """The reference path: one gated forward (α = 0 on the set) per single and pair; returns block calls."""
    N = gates.n
    for i in range(N):
        for j in range(i, N):
            a = torch.ones(N)
            a[[i, j]] = 0.0
            gates.alpha = a
            d = D(model(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False).logits)
            if i == j:
                singles[i] += d
            else:
                pairs[i, j] += d
            bar.update(1)
    gates.alpha = torch.ones(N)
    return N * (N * (N + 1) // 2)


@torch.no_grad()
def divergence_of_sets(model, calibration: CalibrationSet | Sequence[dict], sets: Sequence[Sequence[int]], *,
                       objective: str = "kl", batch_size: int = 8, response_only: bool = False) -> np.ndarray:
    """D of arbitrary removal sets (each the model without those blocks, :func:`without_blocks`, which equals the
    gated model; the dense log-probabilities computed once per batch): the measurement the refit and the re-ranking
    of pair-energy states use. Shape (len(sets),), float64."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    batches = make_batches(model, list(calibration), batch_size, response_only)
    sets = [sorted(int(i) for i in s) for s in sets]
    out = np.zeros(len(sets))
    tokens = 0
    with Gates(model) as gates:
        for b in batches:
            gates.alpha = torch.ones(gates.n)
            D = _Divergence(objective, model(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False).logits,
                            b)
            tokens += D.tokens
            for k, s in enumerate(sets):
                with _removed(model, gates, s):
                    out[k] += D(model(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False).logits)
    return out / tokens


@contextlib.contextmanager
def _removed(model, gates: Gates, s: list[int]):
    """The model without the blocks ``s``: taken out in place when that is a valid removal (the cheaper way), else
    gated (α = 0 on them — e.g. the last attention block of a hybrid, which the pair table measures too)."""
    try:
        check_removal(model, s)
    except RemovalError:
        with gates.removed(s):
            yield
        return
    with without_blocks(model, s):
        yield


def cached_pair_table(model, calibration: CalibrationSet, path, *, objective: str = "kl", batch_size: int = 8,
                      progress: bool = True, **prov) -> PairTable:
    """The pair table at ``path`` when its sidecar records the same calibration and options, else measured
    (resumable from ``<path>.partial``) and saved."""
    path = Path(path)
    params = {"objective": objective, "batch_size": batch_size, "calibration_sha256": calibration.sha256,
              "samples": len(calibration)}
    if path.is_file() and sidecar_path(path).is_file() and read_json(sidecar_path(path)).get("parameters") == params:
        return load_pair_table(path)
    table = measure_pair_table(model, calibration, objective=objective, batch_size=batch_size, progress=progress,
                               checkpoint=path.with_name(path.name + ".partial"))
    table.save(path, provenance("pair_table", params, **prov))
    return table


__all__ = ["PAIRS_FILE", "OBJECTIVES", "PairTable", "load_pair_table", "measure_pair_table", "divergence_of_sets",
           "cached_pair_table"]
