"""Baseline block-removal criteria, in one harness with the same calibration data as CBO.

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
  of the per-sample mean NLL (:func:`cbo_utils.gradients.sample_loss`). With fixed-length windows and all tokens
  counted the two are the same.
- Removal during a search is the gated model (α = 0, :class:`cbo_utils.model.blocks.Gates`), which equals physical
  removal. Hybrid models (Nemotron-H) never lose their last attention block: candidates that would do so are
  skipped (greedy methods) or passed over for the next-lowest score (one-shot methods).
- Ties in a score are broken by the lower block index.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cbo_utils.gradients import sample_loss
from cbo_utils.model.blocks import ATTENTION, Gates, check_removal, get_adapter, model_layers
from cbo_utils.model.loss import BlockTaps, RemovalLoss, forward_blocks, make_batches
from cbo_utils.select.selection import Selection, check_M, describe_calibration, selection_meta, timed

log = logging.getLogger(__name__)


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
    adapter, layers, N = model_layers(model)
    removed = list(removed)
    batches = make_batches(model, calibration, batch_size, pad_token_id=pad_token_id)
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
        with BlockTaps(layers) as taps:
            for b in batches:
                forward_blocks(model, b)
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
        _, _, N = model_layers(model)
        check_M(N, M)
        stats = block_statistics(model, calibration, batch_size)
        first = stats["bi"].tolist()
        if not iterative:
            removed = _pick_lowest(model, first, M, range(N))
            order = sorted(removed, key=lambda i: (first[i], i))
            return Selection("block_influence", M, removed, order=order, scores=first,
                             calibration=describe_calibration(calibration),
                             meta=selection_meta(model, batch_size=batch_size))
        removed: list[int] = []
        relative: list[int] = []
        step_seconds: list[float] = []
        t0 = time.perf_counter()
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
            step_seconds.append(round(time.perf_counter() - t0, 3))
            log.info("iterative BI step %d/%d: remove block %d (BI %.5f)", step + 1, M, best, bi[best])
        return Selection("block_influence_iterative", M, removed, order=list(removed), relative=relative,
                         scores=first, calibration=describe_calibration(calibration),
                         meta=selection_meta(model, batch_size=batch_size, step_seconds=step_seconds))

    return timed(run)


def norm_ratio(model, calibration, M: int, batch_size: int = 1) -> Selection:
    """Remove the M blocks with the lowest mean_tokens ‖h_out‖/‖h_in‖ (one shot; the paper's norm-ratio baseline)."""

    def run():
        _, _, N = model_layers(model)
        check_M(N, M)
        scores = block_statistics(model, calibration, batch_size)["norm_ratio"].tolist()
        removed = _pick_lowest(model, scores, M, range(N))
        return Selection("norm_ratio", M, removed, order=sorted(removed, key=lambda i: (scores[i], i)),
                         scores=scores, calibration=describe_calibration(calibration),
                         meta=selection_meta(model, batch_size=batch_size))

    return timed(run)


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
        _, _, N = model_layers(model)
        check_M(N, M)
        D = angular_distances(block_statistics(model, calibration, batch_size)["last_states"], M).tolist()
        starts = [s for s in range(N - M + 1) if _feasible(model, range(s, s + M))]
        if not starts:
            raise ValueError(f"every run of {M} consecutive blocks contains every attention block")
        best = min(starts, key=lambda s: (D[s], s))
        return Selection("angular_distance", M, list(range(best, best + M)), scores=D,
                         calibration=describe_calibration(calibration),
                         meta=selection_meta(model, batch_size=batch_size, start=best, distance=D[best],
                                    scores_are="D(l) for l = 0..N-M"))

    return timed(run)


def tail(model, calibration=None, M: int = 1) -> Selection:
    """The last M blocks before the final one: [N−1−M, N−1). ``calibration`` is not used (kept for the common
    signature)."""

    def run():
        _, _, N = model_layers(model)
        check_M(N, M)
        if M > N - 1:
            raise ValueError(f"tail keeps the last block: M can be at most {N - 1}")
        removed = check_removal(model, range(N - 1 - M, N - 1))
        return Selection("tail", M, removed,
                         calibration=None if calibration is None else describe_calibration(calibration),
                         meta=selection_meta(model))

    return timed(run)


def one_shot_perplexity(model, calibration, M: int, batch_size: int = 1, response_only: bool = False,
                        prefix_cache: bool = True, progress: bool = False) -> Selection:
    """Shortened LLaMA's "PPL" criterion: I_i = calibration perplexity with only block i removed (gated); remove the
    M lowest. Scores are perplexities. Uses the dense model's prefix cache (see :func:`sleb`)."""

    def run():
        _, _, N = model_layers(model)
        check_M(N, M)
        batches = make_batches(model, calibration, batch_size, response_only)
        with RemovalLoss(model, batches, prefix_cache) as ev:
            ev.set_removed([])
            from tqdm.auto import tqdm

            ppl = [math.exp(ev.nll(i)) if _feasible(model, [i]) else math.inf
                   for i in tqdm(range(N), desc="one-shot perplexity", unit="block", disable=not progress)]
            status, calls = ev.cache_status, ev.block_calls
        removed = _pick_lowest(model, ppl, M, range(N))
        return Selection("one_shot_perplexity", M, removed, order=sorted(removed, key=lambda i: (ppl[i], i)),
                         scores=[p if math.isfinite(p) else None for p in ppl],
                         calibration=describe_calibration(calibration),
                         meta=selection_meta(model, batch_size=batch_size, response_only=response_only,
                                             prefix_cache=status, block_calls=calls))

    return timed(run)


def sleb(model, calibration, M: int, batch_size: int = 1, response_only: bool = False, prefix_cache: bool = True,
         exclude: Iterable[int] | None = None, progress: bool = False) -> Selection:
    """SLEB (Song et al. 2024): for t = 1..M remove the block whose removal, given those already removed, gives the
    lowest calibration NLL. The first and last blocks are never removed (``exclude`` adds more).

    ``prefix_cache=True`` (default) runs each candidate from the cached input of its block (see
    :class:`RemovalLoss`): candidate i costs the N−1−i blocks after it instead of N, and after a choice only the
    blocks above it are recomputed. It works for every adapter whose blocks can be replayed with the arguments the
    model passed them (checked once per run; otherwise it falls back to gated full forwards and says so in
    ``meta["prefix_cache"]``). It chooses exactly what ``prefix_cache=False`` (one gated full forward per candidate)
    chooses. The cache holds N hidden states per calibration token (N·tokens·hidden·bytes: 0.28 GB for SmolLM2 with
    16 × 256 tokens, tens of GB for an 8B model with 2,048 long conversations: then use ``prefix_cache=False``).
    ``scores`` = first-step NLL per candidate; ``meta["step_nll"]`` = the NLL after each removal;
    ``meta["block_calls"]`` = block forward passes spent (a full forward counts N). ``progress``: a bar over the
    candidate evaluations of all M steps.
    """
    from tqdm.auto import tqdm

    def run():
        _, _, N = model_layers(model)
        check_M(N, M)
        banned = {0, N - 1} | set(exclude or ())
        n_free = N - len(banned & set(range(N)))
        bar = tqdm(total=sum(max(n_free - t, 0) for t in range(M)), desc=f"SLEB (M = {M})", unit="candidate",
                   disable=not progress)
        batches = make_batches(model, calibration, batch_size, response_only)
        removed: list[int] = []
        step_nll: list[float] = []
        step_seconds: list[float] = []
        first: list[float | None] = [None] * N
        t0 = time.perf_counter()
        with RemovalLoss(model, batches, prefix_cache) as ev:
            ev.set_removed([])
            for step in range(M):
                cands = [i for i in range(N) if i not in banned and i not in removed
                         and _feasible(model, removed + [i])]
                if not cands:
                    raise ValueError(f"SLEB has no candidate block left at step {step + 1} (first/last block and "
                                     "the last attention block of a hybrid are never removed)")
                nll = {}
                for i in cands:
                    nll[i] = ev.nll(i)
                    bar.update(1)
                if step == 0:
                    for i, v in nll.items():
                        first[i] = v
                best = min(cands, key=lambda i: (nll[i], i))
                removed.append(best)
                step_nll.append(nll[best])
                step_seconds.append(round(time.perf_counter() - t0, 3))
                log.info("SLEB step %d/%d: remove block %d (calibration NLL %.5f)", step + 1, M, best, nll[best])
                if step < M - 1:
                    ev.set_removed(removed)
            status, calls = ev.cache_status, ev.block_calls
        bar.close()
        return Selection("sleb", M, removed, order=list(removed), scores=first,
                         calibration=describe_calibration(calibration),
                         meta=selection_meta(model, batch_size=batch_size, response_only=response_only,
                                             prefix_cache=status, block_calls=calls, step_nll=step_nll,
                                             step_seconds=step_seconds))

    return timed(run)


def greedy_prefix(sel: Selection, M: int) -> Selection:
    """The selection of ``M`` blocks contained in a greedy path (SLEB, iterative block influence) or a one-shot
    ranking (one-shot perplexity, block influence): its first ``M`` choices — exactly what the method run for ``M``
    returns, as every step depends on the earlier ones only. The seconds are those spent up to step ``M``
    (``meta["step_seconds"]``; a ranking's whole cost when it has none)."""
    if sel.order is None or len(sel.order) < M:
        raise ValueError(f"the path of {sel.method} has {len(sel.order or [])} steps; it cannot give M = {M}")
    steps = sel.meta.get("step_seconds") or []
    meta = {**sel.meta, "step_nll": (sel.meta.get("step_nll") or [])[:M], "step_seconds": steps[:M],
            "path_of": sel.M}
    return Selection(sel.method, M, sorted(sel.order[:M]), order=list(sel.order[:M]),
                     relative=list(sel.relative[:M]) if sel.relative else sel.relative, scores=sel.scores,
                     seconds=float(steps[M - 1]) if len(steps) >= M else sel.seconds, calibration=sel.calibration,
                     meta=meta)


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
        adapter, layers, N = model_layers(model)
        check_M(N, M)
        eligible = list(range(keep_first, N - keep_last))
        if len(eligible) < M:
            raise ValueError(f"Taylor+ may only remove blocks {keep_first}..{N - keep_last - 1} "
                             f"({len(eligible)} blocks); M = {M} is too many")
        batches = make_batches(model, calibration, batch_size, response_only)
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
                         scores=scores, calibration=describe_calibration(calibration),
                         meta=selection_meta(model, batch_size=batch_size, response_only=response_only,
                                    keep_first=keep_first, keep_last=keep_last))

    return timed(run)


# --------------------------------------------------------------------------------------------------- random
def random_selection(N_or_model, M: int, seed: int = 0) -> Selection:
    """A uniform M-subset of the N blocks (``random.Random(seed)``). Given a hybrid model, subsets that remove every
    attention block are redrawn (uniform over the feasible subsets)."""
    t0 = time.perf_counter()
    model = None if isinstance(N_or_model, int) else N_or_model
    N = N_or_model if model is None else model_layers(model)[2]
    check_M(N, M)
    rng = random.Random(seed)
    for _ in range(10_000):
        removed = sorted(rng.sample(range(N), M))
        if model is None or _feasible(model, removed):
            break
    else:
        raise ValueError("no feasible random subset found in 10,000 draws")
    meta = selection_meta(model, seed=seed) if model is not None else {"N": N, "seed": seed}
    return Selection("random", M, removed, seconds=time.perf_counter() - t0, meta=meta)


def random_selections(N_or_model, M: int, seeds: Iterable[int] = range(5)) -> list[Selection]:
    """:func:`random_selection` for each seed."""
    return [random_selection(N_or_model, M, seed) for seed in seeds]


