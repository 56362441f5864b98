"""A faster loglikelihood scorer for lm-evaluation-harness: the context of a multiple-choice item is run once.

lm-eval's ``HFLM`` scores every (context, continuation) request as its own sequence: an ARC question with four
answers runs the question four times, a HellaSwag context four times. :class:`PrefixSharingLM` is ``HFLM`` with one
method replaced, ``_loglikelihood_tokens``: requests are grouped by their (truncated) context tokens; each group's
context runs once with the KV cache (left-padded batches, explicit position ids, only the last position through the
LM head), the cache is copied to the group's continuations, and the continuations run together on it. Everything
else — documents, prompts, tokenisation (``_encode_pair``), truncation, metrics, aggregation, standard errors — is
lm-eval's own, because the class *is* an ``HFLM``.

Exactness is checked, not assumed: the first batch of every instance is scored both ways (this path and ``HFLM``'s)
and the fast path is used only when every log-likelihood agrees within ``atol`` and every greedy flag is equal;
otherwise (a model whose cache cannot be copied per row — Mamba hybrids, for instance — or a mismatch) the instance
falls back to ``HFLM``'s path and records why (:attr:`PrefixSharingLM.status`). ``tests/test_scorer.py`` compares the
per-request log-likelihoods with ``HFLM``'s on tiny models and on SmolLM2.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

#: requests whose scores are compared with HFLM's before the fast path is trusted
CHECK_REQUESTS = 8


class PrefixSharingLM(HFLM):
    """``HFLM`` whose loglikelihood requests share their context's forward pass (see the module docstring).

    ``token_budget``: about how many tokens one forward pass holds (contexts × length, continuations × length);
    ``atol``: the agreement with ``HFLM`` the self-check requires (natural-log units, per request)."""

    def __init__(self, *args, token_budget: int = 512, atol: float = 2e-4, **kw):
        super().__init__(*args, **kw)
        self.token_budget = int(token_budget)
        self.atol = float(atol)
        self.status = "unchecked"   # "prefix sharing" | "HFLM path: <why>"
        self.requests_scored = 0
        self.requests_shared = 0
        self.last_shared = 0
        self.tokens_run = 0

    # ------------------------------------------------------------------------------------------- lm-eval hook
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.backend != "causal" or self.status.startswith("HFLM path"):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        if self.status == "unchecked":
            head = list(requests[:CHECK_REQUESTS])
            why = self._check(head)
            if why:
                self.status = f"HFLM path: {why}"
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            self.status = "prefix sharing"
        out = self._score(requests, disable_tqdm)
        self.requests_scored += len(requests)
        self.requests_shared += self.last_shared
        for (request_str, _, _), answer in zip(requests, out):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return out

    def _check(self, requests) -> str:
        if not requests:
            return ""
        try:
            fast = self._score(requests, disable_tqdm=True)
        except Exception as exc:  # a cache that cannot be copied per row, a model without position_ids, ...
            return f"{type(exc).__name__}: {exc}"[:200]
        ref = super()._loglikelihood_tokens(requests, disable_tqdm=True)
        for (lp, greedy), (lp_ref, greedy_ref) in zip(fast, ref):
            if not math.isfinite(lp) or abs(lp - lp_ref) > self.atol * max(1.0, abs(lp_ref) / 10) \
                    or greedy != greedy_ref:
                return f"self-check mismatch ({lp:.6g} vs HFLM {lp_ref:.6g})"
        return ""

    # --------------------------------------------------------------------------------------------- scoring
    def _split(self, context_enc, continuation_enc) -> tuple[tuple[int, ...], list[int]]:
        """HFLM's truncation: the last max_length + 1 tokens of context + continuation; returns (the context part
        the continuation is conditioned on, the continuation)."""
        assert len(context_enc) > 0 and 0 < len(continuation_enc) <= self.max_length
        full = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
        n = len(continuation_enc)
        return tuple(full[:-n]), full[-n:]

    def _score(self, requests, disable_tqdm: bool) -> list[tuple[float, bool]]:
        groups: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()
        conts = []
        for r, (_, ctx, cont) in enumerate(requests):
            prefix, c = self._split(ctx, cont)
            groups.setdefault(prefix, []).append(r)
            conts.append(c)
        # share a context only where that saves tokens: the context tokens not repeated, (k − 1)·|context|, must exceed
        # the padding the group's continuations add (they are padded to the group's longest); the other requests go
        # through HFLM's own path (sorted by length over all of them, so hardly padded)
        alone = []
        for p in list(groups):
            lens = [len(conts[r]) for r in groups[p]]
            if (len(lens) - 1) * len(p) <= sum(max(lens) - n for n in lens):
                alone += groups.pop(p)
        res: list[tuple[float, bool] | None] = [None] * len(requests)
        if alone:
            for r, answer in zip(alone, super()._loglikelihood_tokens([requests[r] for r in alone], disable_tqdm=True)):
                res[r] = answer
        self.last_shared = len(requests) - len(alone)
        if not groups:
            return res  # type: ignore[return-value]
        # longest requests first (like HFLM: a memory problem shows at once); similar lengths share a batch, so
        # little is padded; a batch holds about token_budget tokens (contexts and continuations, padding included)
        longest = {p: len(p) + max(len(conts[r]) for r in groups[p]) for p in groups}
        order = sorted(groups, key=lambda p: (-longest[p], -len(p)))
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood (shared contexts)")
        batch: list[tuple[int, ...]] = []
        for p in order:
            grown = batch + [p]
            P = max(len(q) for q in grown)
            C = max(len(conts[r]) for q in grown for r in groups[q]) - 1
            if batch and len(grown) * P + sum(len(groups[q]) for q in grown) * C > self.token_budget:
                self._score_batch(batch, groups, conts, res, bar)
                grown = [p]
            batch = grown
        if batch:
            self._score_batch(batch, groups, conts, res, bar)
        bar.close()
        return res  # type: ignore[return-value]

    @torch.no_grad()
    def _score_batch(self, prefixes, groups, conts, res, bar) -> None:
        dev = self.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        B, P = len(prefixes), max(len(p) for p in prefixes)
        ids = torch.full((B, P), pad, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for b, p in enumerate(prefixes):   # left padding: every context ends at the last column
            ids[b, P - len(p):] = torch.tensor(p)
            mask[b, P - len(p):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float()                                  # predicts every continuation's 1st token
        cache = getattr(out, "cache", None) or out.past_key_values
        rows = [(b, r) for b, p in enumerate(prefixes) for r in groups[p]]
        C = max(len(conts[r]) for _, r in rows) - 1
        self.tokens_run += B * P
        rest = None
        if C > 0:   # the continuations' other tokens, on a copy of their context's cache
            idx = torch.tensor([b for b, _ in rows], device=dev)
            cache.batch_select_indices(idx)
            cids = torch.full((len(rows), C), pad, dtype=torch.long)
            cmask = torch.zeros((len(rows), C), dtype=torch.long)
            for k, (_, r) in enumerate(rows):
                c = conts[r][:-1]
                if c:
                    cids[k, :len(c)] = torch.tensor(c)
                    cmask[k, :len(c)] = 1
            lengths = mask.sum(1)[idx]
            cpos = lengths[:, None] + torch.arange(C, device=dev)[None, :]
            full_mask = torch.cat([mask[idx], cmask.to(dev)], dim=1)
            o2 = self.model(input_ids=cids.to(dev), attention_mask=full_mask, position_ids=cpos,
                            cache=cache, use_cache=True)
            valid = cmask.bool().to(dev)
            rest = o2.logits[valid].float()                                 # real positions only, row-major
            self.tokens_run += len(rows) * C
        # log p(token) = logit − logsumexp(logits), on the positions that are scored (none of the padding)
        offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
        for k, (_, r) in enumerate(rows):
            offsets[k + 1] = offsets[k] + len(conts[r]) - 1
        for k, (b, r) in enumerate(rows):
            c = conts[r]
            z = first[b][None] if rest is None or len(c) == 1 else torch.cat([first[b][None],
                                                                              rest[offsets[k]:offsets[k + 1]]])
            target = torch.tensor(c, device=z.device)
            greedy = bool((z.argmax(-1) == target).all())
            lp = z.gather(1, target[:, None])[:, 0] - torch.logsumexp(z, dim=-1)
            res[r] = (float(lp.sum()), greedy)
            bar.update(1)


__all__ = ["CHECK_REQUESTS", "PrefixSharingLM"]
