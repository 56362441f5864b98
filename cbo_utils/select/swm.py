"""Sliding-window merging (the paper's SWM baseline, after Ding et al. 2025): top-down merging of consecutive blocks
while the cosine of the final hidden state to the original stays above a threshold, the threshold bisected to reach
M; :func:`build_swm_model` gives the merged, shortened copy.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cbo_utils.model.blocks import final_norm, merge_windows, merged_parameters, model_layers
from cbo_utils.model.loss import Batch, BlockTaps, block_output, call_block, forward_blocks, make_batches
from cbo_utils.select.selection import Selection, check_M, describe_calibration, selection_meta

log = logging.getLogger(__name__)


class _SWMEvaluator:
    """cos(final hidden merged vs original) for a set of merge windows, memoised, with a prefix cache: merges only
    touch blocks ≥ the lowest window start, so each evaluation starts from the original model's cached input of
    that block."""

    def __init__(self, model, batches: list[Batch]):
        self.model, self.batches = model, batches
        _, self.layers, self.N = model_layers(model)
        self.norm = final_norm(model)
        if self.norm is None:
            raise ValueError("SWM needs the model's final norm (model.model.norm or norm_f); none was found")
        self.inputs, self.kwargs, self.ref = [], [], []
        self.memo: dict[tuple, float] = {}
        self.merged: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self.block_calls = 0
        with torch.no_grad(), BlockTaps(self.layers, keep_kwargs=True, outputs=True) as taps:
            for b in batches:
                forward_blocks(model, b)
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
                    h = block_output(torch.func.functional_call(self.layers[j], self._merged(j, starts[j]),
                                                               (h, *args), kw))
                    j = starts[j] + 1
                else:
                    h = call_block(self.layers[j], h, self.kwargs[bi][j])
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

    return swm_selections(model, calibration, [M], threshold=threshold, batch_size=batch_size, lowest=lowest,
                          tolerance=tolerance, max_steps=max_steps)[M]


def swm_selections(model, calibration, Ms: Iterable[int], threshold: float | None = None, batch_size: int = 1,
                   lowest: int = 0, tolerance: float = 1e-4, max_steps: int = 40) -> dict[int, Selection]:
    """:func:`sliding_window_merging` for several M with ONE evaluator: the calibration forward, the prefix cache and
    the memo of scored merged models are shared, so a merged model that two M's bisections both score is computed
    once. Each M's answer is exactly the single-M call's (a similarity depends only on its windows; tested). Each
    Selection's ``seconds``: its own bisection, the first also the evaluator's set-up."""
    Ms = [int(m) for m in Ms]
    adapter, layers, N = model_layers(model)
    for M in Ms:
        check_M(N, M)
    if adapter.hybrid:
        raise ValueError("sliding-window merging adds the weights of consecutive blocks; the blocks of a hybrid "
                         f"model ({adapter.name}) are different mixers (Mamba2, MoE, attention) that cannot be "
                         "merged. Use block_influence, norm_ratio, sleb or one_shot_perplexity instead.")
    shapes = [{n: tuple(p.shape) for n, p in b.named_parameters()} for b in layers]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("sliding-window merging needs blocks with identical parameters (names and shapes)")
    if not 0 <= lowest < N - 1:
        raise ValueError(f"lowest must be in 0..{N - 2}, got {lowest}")
    for M in Ms:
        if M > N - 1 - lowest:
            raise ValueError(f"with lowest = {lowest} at most {N - 1 - lowest} blocks can be merged away; M = {M}")
    t0 = time.perf_counter()
    batches = make_batches(model, calibration, batch_size)
    ev = _SWMEvaluator(model, batches)
    setup = time.perf_counter() - t0
    out: dict[int, Selection] = {}
    for i, M in enumerate(Ms):
        t1 = time.perf_counter()
        calls0 = ev.block_calls if i else 0
        sel = _swm_select(ev, calibration, M, threshold, batch_size, lowest, tolerance, max_steps)
        sel.meta["block_calls"] = ev.block_calls - calls0
        sel.meta["shared_evaluator"] = len(Ms) > 1
        sel.seconds = time.perf_counter() - t1 + (setup if i == 0 else 0.0)
        out[M] = sel
    return out


def _swm_select(ev: _SWMEvaluator, calibration, M: int, threshold: float | None, batch_size: int, lowest: int,
                tolerance: float, max_steps: int) -> Selection:
    """One M's bisection (or fixed-threshold pass) on an existing evaluator."""
    model = ev.model
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
    return Selection("sliding_window_merging", M, removed, order=order,
                     calibration=describe_calibration(calibration),
                     meta=selection_meta(model, batch_size=batch_size, windows=[[a, b] for a, b in windows],
                                         threshold=t_ok, threshold_fails=t_fail, similarity=sim, capped=capped,
                                         reached_M=len(removed) == M, evaluations=len(ev.memo), passes=passes,
                                         block_calls=ev.block_calls, lowest=lowest,
                                         merge_rule="theta_low + sum_{k=low+1..high}(theta_k - theta_low)"))


@torch.no_grad()
def build_swm_model(model, selection: Selection) -> nn.Module:
    """A merged, physically shortened COPY of ``model`` for an SWM ``selection`` (:func:`Selection.apply` does the
    same): :func:`cbo_utils.model.blocks.merge_windows` of its ``meta['windows']``. ``model`` is untouched."""
    windows = selection.meta.get("windows")
    if not windows:
        raise ValueError("this selection has no merge windows (meta['windows']); build it with "
                         "sliding_window_merging")
    try:
        return merge_windows(model, windows, selection.removed)
    except ValueError as exc:
        raise ValueError(f"the selection's {exc}") from None
