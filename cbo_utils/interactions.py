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

A table may be *partial* (``measure_pair_table(pairs=...)``): the singles and only some pairs are measured; an
unmeasured pair holds the additive estimate D({i,j}) = D({i}) + D({j}) − D(∅) (J_ij = 0), and ``measured`` marks
which pairs are real. The *screened* table (:func:`screen_pairs`) measures only the pairs among the candidate
blocks of the M being solved — N + K(K−1)/2 sets instead of N + N(N−1)/2 (:func:`screened_sets`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
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

#: the values of the ``pair_table`` setting: every pair measured, or the screened table (:func:`screen_pairs`)
PAIR_TABLE_MODES = ("screened", "full")


@dataclass
class PairTable:
    """``D`` on every set of at most two removed blocks (float64): ``base`` = D(∅), ``singles[i]`` = D({i}),
    ``pairs[i, j]`` = D({i, j}) (symmetric; the diagonal holds the singles).

    ``measured``: which pairs were measured (N×N bool, symmetric, diagonal True); ``None`` = every pair. An
    unmeasured pair holds the additive estimate D({i}) + D({j}) − D(∅) — guaranteed on construction (it is written
    there), so J_ij = 0 on it and :meth:`quadratic_form` is the pair energy with those couplings set to 0."""

    base: float
    singles: np.ndarray
    pairs: np.ndarray
    objective: str = "kl"
    meta: dict[str, Any] = field(default_factory=dict)
    measured: np.ndarray | None = None

    def __post_init__(self):
        self.singles = np.asarray(self.singles, dtype=np.float64)
        self.pairs = np.asarray(self.pairs, dtype=np.float64)
        N = self.N
        if self.pairs.shape != (N, N):
            raise ValueError(f"pairs must be {N}×{N} for {N} singles, got shape {self.pairs.shape}")
        if self.measured is None:
            return
        m = np.asarray(self.measured)
        if m.shape != (N, N):
            raise ValueError(f"the measured mask must be {N}×{N}, got shape {m.shape}")
        m = m.astype(bool)
        if not (m == m.T).all():
            raise ValueError("the measured mask must be symmetric (pair (i, j) is pair (j, i))")
        m[np.diag_indices(N)] = True
        self.measured = m
        additive = self.singles[:, None] + self.singles[None, :] - self.base
        self.pairs = np.where(m, self.pairs, additive)
        self.pairs[np.diag_indices(N)] = self.singles

    @property
    def N(self) -> int:
        return int(self.singles.shape[0])

    @property
    def mask(self) -> np.ndarray:
        """The measured mask as an array (all True for a full table); a copy."""
        return np.ones((self.N, self.N), dtype=bool) if self.measured is None else self.measured.copy()

    @property
    def full(self) -> bool:
        """Whether every pair is measured."""
        return self.measured is None or bool(self.measured.all())

    def measured_pairs(self) -> list[tuple[int, int]]:
        """The measured pairs (i, j), i < j, in row order."""
        iu = np.triu_indices(self.N, 1)
        ok = self.mask[iu]
        return [(int(i), int(j)) for i, j in zip(iu[0][ok], iu[1][ok], strict=True)]

    @property
    def sets(self) -> int:
        """The measured sets: every single and the measured pairs (∅ is the dense pass, not counted)."""
        return self.N + len(self.measured_pairs())

    @property
    def h(self) -> np.ndarray:
        """h_i = D({i}) − D(∅)."""
        return self.singles - self.base

    @property
    def J(self) -> np.ndarray:
        """J_ij = D({i,j}) − D({i}) − D({j}) + D(∅) off the diagonal, 0 on it (and 0 on unmeasured pairs)."""
        J = self.pairs - self.singles[:, None] - self.singles[None, :] + self.base
        np.fill_diagonal(J, 0.0)
        if self.measured is not None:
            J[~self.measured] = 0.0   # exactly 0, not a rounding residue of the additive estimate
        return J

    def negative_coupling_fraction(self) -> float:
        """The fraction of J_ij < 0 among the measured pairs i < j (NaN when none is measured): the evidence for how
        safe the additive estimate of the unmeasured pairs is (see :func:`screen_pairs`)."""
        iu = np.triu_indices(self.N, 1)
        ok = self.mask[iu]
        if not ok.any():
            return float("nan")
        return float((self.J[iu][ok] < 0).mean())

    def restricted(self, blocks: Iterable[int]) -> PairTable:
        """This table with only the measured pairs inside ``blocks`` kept; every other pair holds the additive
        estimate (a new table; the singles and D(∅) unchanged)."""
        inside = np.zeros(self.N, dtype=bool)
        inside[[int(b) for b in blocks]] = True
        m = self.mask & np.outer(inside, inside)
        return PairTable(self.base, self.singles.copy(), self.pairs.copy(), self.objective, dict(self.meta), m)

    def quadratic_form(self) -> tuple[np.ndarray, float]:
        """``(Q, const)`` with ``xᵀQx + const`` = D on every set of ≤ 2 blocks whose pair is measured, and the
        additive estimate on an unmeasured pair (Q = diag(h) + J/2)."""
        Q = self.J / 2.0
        Q[np.diag_indices(self.N)] = self.h
        return Q, float(self.base)

    def divergence(self, removed: Sequence[int]) -> float:
        """The measured D of a set of at most two blocks (an unmeasured pair: the additive estimate)."""
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
        if self.measured is not None:
            tensors["measured"] = torch.from_numpy(self.measured.astype(np.uint8))
        meta = {"objective": self.objective, "meta": json.dumps(self.meta, default=str)}
        atomic_write_bytes(path, save(tensors, metadata=meta))
        write_sidecar(path, prov or provenance("pair_table", {"objective": self.objective}))
        return path


def load_pair_table(path) -> PairTable:
    """A :class:`PairTable` saved by :meth:`PairTable.save` (a file without a ``measured`` mask — every file written
    before partial tables — is a full table)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in f.keys()}
    measured = t["measured"].numpy().astype(bool) if "measured" in t else None
    return PairTable(float(t["base"][0]), t["singles"].double().numpy(), t["pairs"].double().numpy(),
                     md.get("objective", "kl"), json.loads(md.get("meta", "{}")), measured)


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


def _pair_mask(pairs, N: int) -> np.ndarray:
    """The wanted pairs as a symmetric N×N bool mask (diagonal False); ``None`` = every pair."""
    want = np.zeros((N, N), dtype=bool)
    if pairs is None:
        want[:] = True
        np.fill_diagonal(want, False)
        return want
    for p in pairs:
        try:
            i, j = (int(x) for x in p)
        except (TypeError, ValueError):
            raise ValueError(f"pairs must be (i, j) pairs of block indices, got {p!r}") from None
        if not (0 <= i < N and 0 <= j < N) or i == j:
            raise ValueError(f"pair {p!r} is not two different blocks of 0..{N - 1}")
        want[i, j] = want[j, i] = True
    return want


def prefix_cache_work(N: int, pairs=None, singles: bool = True) -> tuple[int, int]:
    """The exact work per calibration batch of the prefix-cache measurement of the singles (when ``singles``) and
    of ``pairs`` (``None`` = every pair): ``(block calls, head passes)``, as :func:`measure_pair_table` counts them —
    block calls after the dense forward (a single {i} runs blocks i+1..N−1; without the singles, i runs only up to
    the input of its last wanted j; a pair {i, j} runs j+1..N−1), head passes one per measured set plus the dense
    pass. Multiply by the number of batches for a whole table."""
    want = _pair_mask(pairs, N)
    calls, heads = 0, 1
    for i, js in _schedule(want, singles):
        last = N - 1 if singles else max(js)
        calls += (last - i) if singles else (last - 1 - i)
        heads += int(singles) + len(js)
        calls += sum(N - 1 - j for j in js)
    return calls, heads


def _schedule(want: np.ndarray, singles: bool) -> list[tuple[int, list[int]]]:
    """(i, the wanted j > i) for every i that has work: its single (``singles``) or a wanted pair."""
    N = want.shape[0]
    out = []
    for i in range(N):
        js = [int(j) for j in np.flatnonzero(want[i, i + 1:]) + i + 1]
        if singles or js:
            out.append((i, js))
    return out


@torch.no_grad()
def measure_pair_table(model, calibration: CalibrationSet | Sequence[dict], *, objective: str = "kl",
                       batch_size: int = 8, response_only: bool = False, prefix_cache: bool = True,
                       checkpoint=None, progress: bool = True, pairs: Iterable[Sequence[int]] | None = None,
                       extend: PairTable | None = None) -> PairTable:
    """Measure D on ∅, every block and the pairs ``pairs`` (``None`` = every pair; see the module docstring).

    ``pairs``: (i, j) block pairs to measure; the others hold the additive estimate and are marked unmeasured in
    ``measured``. Without ``extend`` the singles are always measured; with ``extend`` (a table this function measured
    on the same model, calibration and options) its singles, D(∅) and measured pairs are kept as they are — not
    measured again — and only the wanted pairs it lacks are measured (an error if it was measured otherwise). In
    both paths (prefix cache and gated forwards) a block with no wanted work is skipped; a measured entry is the same
    number, bit for bit, as in the full table. ``checkpoint``: a file; the sums after each batch are saved there and
    a rerun with the same model, calibration, options and wanted pairs resumes; it is deleted at the end.

    ``meta`` counts, over the table's life (an extension adds to its table's): ``sets`` (measured sets: every single
    and the measured pairs), ``block_calls`` (after the dense forward), ``head_passes`` (one per measured set per
    batch, plus the dense pass of each batch), ``seconds``; ``runs`` lists each measurement with its own counts;
    ``negative_couplings`` is the fraction of J < 0 among the measured pairs."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    samples = list(calibration)
    adapter, layers, N = model_layers(model)
    key = _run_key(model, samples, objective, batch_size, response_only)
    want = _pair_mask(pairs, N)
    do_singles = extend is None
    if extend is not None:
        if extend.N != N or extend.objective != objective:
            raise ValueError(f"the table to extend has {extend.N} blocks and objective {extend.objective!r}; this "
                             f"model has {N} blocks and the objective is {objective!r}: measure a new table")
        want &= ~extend.mask
        if want.any() and extend.meta.get("key") != key:
            raise ValueError("the table to extend was measured on another model, calibration or options (its "
                             "measurement key differs, or it predates keys): measure a new table instead")
    run_key = key
    if pairs is not None or extend is not None:   # a full table keeps today's key (its checkpoints resume)
        run_key = hashlib.sha256((key + str(do_singles)).encode() + np.packbits(want).tobytes()).hexdigest()[:24]
    sched = _schedule(want, do_singles)
    n_sets = sum(int(do_singles) + len(js) for _, js in sched)
    prior = dict(extend.meta) if extend is not None else {}
    if extend is not None and n_sets == 0:
        return PairTable(extend.base, extend.singles.copy(), extend.pairs.copy(), objective, prior, extend.measured)
    batches = make_batches(model, samples, batch_size, response_only)
    norm, head = final_norm(model), model.get_output_embeddings()
    use_cache = prefix_cache and norm is not None and head is not None
    cache_status = "on" if use_cache else ("off (asked)" if not prefix_cache else "off: final norm or head not found")
    singles, sums = np.zeros(N), np.zeros((N, N))
    base, tokens, start, block_calls, head_passes = 0.0, 0, 0, 0, 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        with safe_open(str(ckpt), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("info", "{}"))
            st = {k: f.get_tensor(k) for k in f.keys()}
        if info.get("key") == run_key:
            singles, sums = st["singles"].double().numpy(), st["pairs"].double().numpy()
            base, tokens, start, cache_status = info["base"], info["tokens"], info["batches"], info["cache"]
            block_calls, head_passes = info.get("block_calls", 0), info.get("head_passes", 0)
            use_cache = cache_status == "on"
    bar = tqdm(total=len(batches) * n_sets, initial=start * n_sets, desc=f"pair table ({objective})", unit="set",
               disable=not progress)
    t0 = time.perf_counter()
    with Gates(model, adapter=adapter) as gates:
        for bi in range(start, len(batches)):
            b = batches[bi]
            gates.alpha = torch.ones(N)
            with BlockTaps(layers, keep_kwargs=True, outputs=False) as taps:
                dense_logits = model(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False).logits
            D = _Divergence(objective, dense_logits, b, head)
            base += D(dense_logits) if objective == "ce" else 0.0
            tokens += D.tokens
            head_passes += 1
            inputs, kwargs = list(taps.inputs), list(taps.kwargs)
            if use_cache and bi == start and start == 0:
                use_cache, cache_status = _validate(layers, norm, head, inputs, kwargs, dense_logits)
            if use_cache:
                block_calls += _pairs_from_cache(layers, norm, head, inputs, kwargs, D, singles, sums, bar, sched,
                                                 do_singles)
            else:
                block_calls += _pairs_gated(model, gates, b, D, singles, sums, bar, sched, do_singles)
            head_passes += n_sets
            del dense_logits, D, inputs, kwargs
            if ckpt is not None and bi + 1 < len(batches):
                info = {"key": run_key, "base": base, "tokens": tokens, "batches": bi + 1, "cache": cache_status,
                        "block_calls": block_calls, "head_passes": head_passes}
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(ckpt, save({"singles": torch.from_numpy(singles), "pairs": torch.from_numpy(sums)},
                                              metadata={"info": json.dumps(info)}))
    bar.close()
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    seconds = round(time.perf_counter() - t0, 3)
    sums = np.triu(sums / tokens, 1)
    new = np.triu(want, 1)
    if extend is not None:
        if tokens != extend.meta.get("tokens"):
            raise ValueError(f"the table to extend counted {extend.meta.get('tokens')} tokens, this calibration "
                             f"{tokens}: measure a new table")
        singles, base = extend.singles.copy(), float(extend.base)
        pairs_ = np.where(new | new.T, sums + sums.T, extend.pairs)
        mask = extend.mask | want
    else:
        singles, base = singles / tokens, base / tokens
        pairs_ = sums + sums.T
        mask = want | np.eye(N, dtype=bool)
    pairs_[np.diag_indices(N)] = singles
    run = {"sets": n_sets, "pairs": int(new.sum()), "singles": do_singles, "block_calls": block_calls,
           "head_passes": head_passes, "seconds": seconds, "batches": len(batches), "resumed_from_batch": start}
    table = PairTable(float(base), singles, pairs_, objective, {}, None if mask.all() else mask)
    meta = {"blocks": N, "samples": len(samples), "tokens": tokens, "objective": objective,
            "batch_size": batch_size, "response_only": response_only,
            "prefix_cache": cache_status if do_singles else prior.get("prefix_cache", cache_status),
            "sets": table.sets, "block_calls": block_calls + int(prior.get("block_calls", 0)),
            "head_passes": head_passes + int(prior.get("head_passes", 0)), "resumed_from_batch": start,
            "seconds": round(seconds + float(prior.get("seconds", 0.0)), 3), "block_types": adapter.block_types(model),
            "key": key, "runs": [*prior.get("runs", []), run],
            "negative_couplings": table.negative_coupling_fraction(), "measured_couplings": table.sets - N}
    if not do_singles and cache_status != prior.get("prefix_cache"):
        meta["prefix_cache_extension"] = cache_status
    if isinstance(calibration, CalibrationSet):
        meta["calibration"] = calibration.describe()
    for k, v in prior.items():
        meta.setdefault(k, v)
    table.meta = meta
    return table


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


def _pairs_from_cache(layers, norm, head, inputs, kwargs, D, singles, pairs, bar, sched=None,
                      do_singles: bool = True) -> int:
    """Add this batch's divergence sums of the singles (``do_singles``) and of the scheduled pairs (``sched``: the
    (i, [j…]) of :func:`_schedule`; ``None`` = every single and pair), from the prefix cache; returns block calls."""
    N, calls = len(layers), 0
    if sched is None:
        sched = [(i, list(range(i + 1, N))) for i in range(N)]
    for i, js in sched:
        last = N - 1 if do_singles else max(js)
        h, entering = inputs[i], {}
        for j in range(i + 1, last + 1):   # the model without block i, recording what enters each later block
            entering[j] = h
            if do_singles or j < last:
                h = call_block(layers[j], h, kwargs[j])
                calls += 1
        if do_singles:
            singles[i] += D.from_hidden(norm(h), head)
            bar.update(1)
        for j in js:   # then without i and j: from the input of j, skip j
            g = entering[j]
            for k in range(j + 1, N):
                g = call_block(layers[k], g, kwargs[k])
                calls += 1
            pairs[i, j] += D.from_hidden(norm(g), head)
            bar.update(1)
    return calls


def _pairs_gated(model, gates: Gates, b: Batch, D, singles, pairs, bar, sched=None, do_singles: bool = True) -> int:
    """The reference path: one gated forward (α = 0 on the set) per scheduled single and pair (``sched`` as in
    :func:`_pairs_from_cache`); returns block calls."""
    N = gates.n
    if sched is None:
        sched = [(i, list(range(i + 1, N))) for i in range(N)]
    sets = 0
    for i, js in sched:
        for j in ([i] if do_singles else []) + list(js):
            a = torch.ones(N)
            a[[i, j]] = 0.0
            gates.alpha = a
            d = D(model(input_ids=b.ids, attention_mask=b.attention_mask, use_cache=False).logits)
            if i == j:
                singles[i] += d
            else:
                pairs[i, j] += d
            sets += 1
            bar.update(1)
    gates.alpha = torch.ones(N)
    return N * sets


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


# ------------------------------------------------------------------------------------------------ screening
def screen_size(N: int, M: int, margin: int = 4, keep: Iterable[int] = ()) -> int:
    """K = min(free blocks, M + margin): the size of the first candidate set of :func:`screen_pairs`."""
    free = N - len(set(int(b) for b in keep))
    if not 0 < M <= free:
        raise ValueError(f"M = {M} blocks cannot be removed from {free} removable blocks (N = {N})")
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"screen_margin must be a non-negative integer, got {margin!r}")
    return min(free, M + int(margin))


def screened_sets(N: int, M: int, margin: int = 4) -> int:
    """The sets :func:`screen_pairs` measures before any coverage extension: every single and every pair of the K
    candidates, N + K(K−1)/2 with K = min(N, M + margin) (the full table: N + N(N−1)/2)."""
    K = screen_size(N, M, margin)
    return N + K * (K - 1) // 2


def screen_candidates(singles: np.ndarray, M: int, margin: int = 4, keep: Iterable[int] = ()) -> list[int]:
    """The first candidate set: the K = min(removable, M + margin) removable blocks of lowest single D (ties: the
    lower index), sorted. Blocks in ``keep`` are never candidates."""
    singles = np.asarray(singles, dtype=np.float64)
    keep = {int(b) for b in keep}
    K = screen_size(len(singles), M, margin, keep)
    free = [i for i in np.argsort(singles, kind="stable").tolist() if i not in keep]
    return sorted(free[:K])


@dataclass
class Screen:
    """The result of :func:`screen_pairs`: ``table`` (exact on every pair inside ``candidates``, the additive
    estimate elsewhere), ``states`` (what ``states_used`` returned on it, all inside ``candidates``), ``rounds`` (the
    solves), ``history`` (the candidate set of each round)."""

    table: PairTable
    candidates: list[int]
    states: Any
    rounds: int
    history: list[list[int]]

    @property
    def sets(self) -> int:
        """The sets this screen needs measured: every single and every pair of its candidates."""
        K = len(self.candidates)
        return self.table.N + K * (K - 1) // 2


def screen_pairs(table: PairTable, M: int, measure: Callable[[list[tuple[int, int]]], PairTable],
                 states_used: Callable[[PairTable], Sequence[Sequence[int]]], *, margin: int = 4,
                 keep: Iterable[int] = ()) -> Screen:
    """The screened pair table for removing ``M`` blocks — the rule:

    1. measure the singles (``table`` holds them; it may hold pairs too, which are used only inside the candidates);
    2. the candidate set C = the K removable blocks of lowest single D, K = min(removable, M + ``margin``) (blocks in
       ``keep`` are never candidates; :func:`screen_candidates`);
    3. measure every pair within C (``measure(pairs)`` is called with the pairs within C the table lacks and returns
       the table with them measured; pairs outside C keep the additive estimate D({i}) + D({j}) − D(∅), J = 0);
    4. solve: ``states_used(view)`` returns every state the selection will use of the pair energy ``view`` (exact
       inside C, additive outside) — the k lowest states it solves for, the re-ranking pool, the ground state that
       starts a swap search, the states of a refit's first round;
    5. coverage: if every block of every such state lies in C, stop; else add those blocks to C and go to 3.

    It terminates: C only grows, at worst to every removable block (= the full table on them; a state never holds a
    kept block). The guarantee: a state x inside C has the exact pair energy, E_screen(x) = E_full(x); for any state,
    E_screen(x) = E_full(x) − Σ J_ij over its unmeasured pairs, so the additive estimate is a lower bound of the pair
    energy of a state outside C exactly when the sum of its unmeasured couplings is ≥ 0 — in particular when each
    unmeasured J_ij ≥ 0. Then, since the used states lie inside C, the screened ground state is a ground state of
    the full table (the same state up to ties in energy), and the screened k lowest states are the full table's k
    lowest. With negative unmeasured couplings a state outside C can be lower on the full table than on the screened
    one: the rule then only guarantees the coverage (every used state is exact). ``meta['negative_couplings']`` of a
    measured table is the fraction of J < 0 among the measured pairs — the evidence for how safe the estimate is.
    """
    keep = {int(b) for b in keep}
    C = set(screen_candidates(table.singles, M, margin, keep))
    history, rounds = [], 0
    while True:
        have = table.mask
        missing = [(i, j) for i, j in itertools.combinations(sorted(C), 2) if not have[i, j]]
        if missing:
            table = measure(missing)
            have = table.mask
            lacking = [p for p in missing if not have[p]]
            if lacking:
                raise RuntimeError(f"measure() returned a table without the pairs it was asked for, e.g. {lacking[:3]}")
        history.append(sorted(C))
        view = table.restricted(C)
        states = states_used(view)
        rounds += 1
        used = {int(b) for s in states for b in s}
        if used & keep:
            raise ValueError(f"states_used returned states removing kept blocks {sorted(used & keep)}")
        if used <= C:
            return Screen(view, sorted(C), states, rounds, history)
        C |= used


class ScreenedTableFile:
    """The screened pair table of one calibration part, cached at ``path`` and shared by every M: the singles are
    measured when the file is made; :meth:`measure` (the ``measure`` callback of :func:`screen_pairs`) extends it in
    place with the pairs a larger M needs — never measuring a pair again — and saves it (atomically, with its
    sidecar). A cached file whose sidecar records other parameters (calibration, objective, batch size, margin), or
    whose measurement key differs (another model), is measured again from scratch; its candidate sets per M are
    recorded in the table's meta and the sidecar. ``measured_seconds``/``measured_sets``: what this object measured
    (the singles if it made the file, and the extensions)."""

    def __init__(self, model, calibration: CalibrationSet, path, *, objective: str = "kl", batch_size: int = 8,
                 screen_margin: int = 4, progress: bool = True, **prov):
        self.model, self.calibration, self.path = model, calibration, Path(path)
        self.objective, self.batch_size, self.progress, self.prov = objective, batch_size, progress, prov
        self.params = {"objective": objective, "batch_size": batch_size, "calibration_sha256": calibration.sha256,
                       "samples": len(calibration), "pair_table": "screened", "screen_margin": int(screen_margin)}
        self.measured_seconds, self.measured_sets = 0.0, 0
        side = sidecar_path(self.path)
        self.table = None
        if self.path.is_file() and side.is_file() and read_json(side).get("parameters") == self.params:
            cached = load_pair_table(self.path)
            if cached.meta.get("key") == _run_key(model, list(calibration), objective, batch_size, False):
                self.table = cached   # else: another model (or an older format) under the same name
        if self.table is None:
            self.table = self._measure(pairs=[])

    def _measure(self, pairs, extend: PairTable | None = None) -> PairTable:
        t = measure_pair_table(self.model, self.calibration, objective=self.objective, batch_size=self.batch_size,
                               progress=self.progress, pairs=pairs, extend=extend,
                               checkpoint=self.path.with_name(self.path.name + ".partial"))
        if t.meta.get("runs") and (extend is None or len(t.meta["runs"]) > len(extend.meta.get("runs", []))):
            self.measured_seconds += float(t.meta["runs"][-1]["seconds"])
            self.measured_sets += int(t.meta["runs"][-1]["sets"])
        self._save(t)
        return t

    def _save(self, t: PairTable) -> None:
        screens = t.meta.get("screens", {})
        union = sorted({b for s in screens.values() for b in s["candidates"]})
        t.save(self.path, provenance("pair_table", self.params, candidates=union, screens=screens,
                                     sets=t.sets, **self.prov))

    def measure(self, pairs: list[tuple[int, int]]) -> PairTable:
        """The table with ``pairs`` measured too (only those it lacks are measured), saved."""
        self.table = self._measure(pairs, extend=self.table)
        return self.table

    def record(self, M: int, screen: Screen) -> None:
        """Record the candidate set M's screen used (table meta and sidecar)."""
        self.table.meta.setdefault("screens", {})[str(M)] = {"candidates": screen.candidates,
                                                              "rounds": screen.rounds, "sets": screen.sets}
        self._save(self.table)


__all__ = ["PAIRS_FILE", "OBJECTIVES", "PAIR_TABLE_MODES", "PairTable", "load_pair_table", "measure_pair_table",
           "prefix_cache_work", "divergence_of_sets", "cached_pair_table", "screen_size", "screened_sets",
           "screen_candidates", "Screen", "screen_pairs", "ScreenedTableFile"]
