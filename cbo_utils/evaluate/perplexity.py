"""Held-out perplexity of gated, pruned or dense models.

Policy (state it with every number): the held-out passages are concatenated (separated by a blank
line), tokenised once, and cut into non-overlapping windows of ``seq_len`` tokens; with ``bos=True`` every window
starts with the tokenizer's BOS token followed by ``seq_len − 1`` text tokens, and the BOS is never predicted.
Perplexity = exp(total NLL / total predicted tokens), float64 accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cbo_utils.model.blocks import check_removal, without_blocks
from cbo_utils.model.load import model_device


def perplexity_windows(tokenizer, texts: Sequence[str], seq_len: int = 256, windows: int = 16, bos: bool = True
                       ) -> torch.Tensor:
    """(windows, seq_len) token ids following the module's policy; a clear error when the text is too short."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    use_bos = bos and tokenizer.bos_token_id is not None
    body = seq_len - int(use_bos)
    n = len(ids) // body
    if n < windows:
        raise ValueError(f"the held-out text gives {n} windows of {seq_len} tokens but {windows} were asked for; "
                         "ask for fewer windows or give more text")
    rows = [([tokenizer.bos_token_id] if use_bos else []) + ids[i * body:(i + 1) * body] for i in range(windows)]
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, removed: Sequence[int] | None = None) -> dict:
    """Perplexity and next-token top-1 accuracy of ``model`` on pre-cut ``windows`` (every position after the first
    is predicted; float64 accumulation). With ``removed`` the model is evaluated without those blocks — the physically
    pruned model, in place for the call (:func:`~cbo_utils.model.blocks.without_blocks`), equal to α = 0 on them."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a (n, seq_len ≥ 2) tensor of token ids, got shape {tuple(windows.shape)}")
    dev = model_device(model)
    nll, correct, count = 0.0, 0, 0
    window_nll: list[float] = []  # Σ NLL of each window (the unit the paired intervals resample)
    with without_blocks(model, check_removal(model, removed) if removed else []):
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i:i + batch_size].to(dev)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
            logits = logits if logits.dtype == torch.float64 else logits.float()
            target = x[:, 1:].to(logits.device)
            rows = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").double().sum(1)
            window_nll += rows.cpu().tolist()
            nll += float(rows.sum())
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "accuracy": correct / count, "tokens": count,
            "seq_len": int(windows.shape[1]), "windows": int(windows.shape[0]), "window_nll": window_nll,
            "window_tokens": int(windows.shape[1]) - 1}
