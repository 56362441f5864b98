"""Held-out perplexity of gated, pruned or dense models.

Policy (state it with every number): the held-out passages are concatenated (separated by a blank
line), tokenised once, and cut into non-overlapping windows of ``seq_len`` tokens; with ``bos=True`` every window
starts with the tokenizer's BOS token followed by ``seq_len − 1`` text tokens, and the BOS is never predicted.
Perplexity = exp(total NLL / total predicted tokens), float64 accumulation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cbo_utils.model.blocks import check_removal, final_norm, model_layers, without_blocks
from cbo_utils.model.load import model_device
from cbo_utils.model.loss import BlockTaps, replay_blocks, replay_matches

log = logging.getLogger(__name__)


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


class WindowCache:
    """Perplexity windows with a prefix cache for many removals from ONE model: the first removal measured records,
    for every batch of windows, the dense model's input to every block and the exact arguments the model passes to
    it; a removal R then starts from the cached input of block min(R) and runs only the kept blocks after it, the
    final norm and the LM head (blocks before min(R) are the dense model's, so they are never recomputed). Pass it
    to :func:`perplexity` in place of the windows tensor: the answer is the one of the physically pruned model.

    Used only when it is exact and safe, else :func:`perplexity` runs the plain forward: for the model it was built
    from (another model, or this one after an in-place change of any parameter, is measured plainly), with a final
    norm and a plain LM head found, when the cache fits ``max_bytes`` (N × windows × seq_len × hidden), and after
    checking its first removal against the plain forward on the first batch (``status`` says which, and why)."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 4, max_bytes: int = 2 << 30):
        _check_windows(windows)
        self.model, self.windows, self.batch_size, self.max_bytes = model, windows, batch_size, max_bytes
        self.status = "not built"
        self.inputs: list[list[torch.Tensor]] = []
        self.kwargs: list[list] = []
        self._versions: int | None = None

    @property
    def shape(self) -> torch.Size:
        return self.windows.shape

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def usable(self, model) -> bool:
        """Whether a removal from ``model`` can use the cache (building it on first use)."""
        if model is not self.model or self.status.startswith("off"):
            return False
        if self._versions is not None and self._versions != _param_versions(model):
            self.inputs, self.kwargs, self._versions, self.status = [], [], None, "not built"   # changed in place
        if not self.inputs:
            self._build()
        return not self.status.startswith("off")

    @torch.no_grad()
    def _build(self) -> None:
        model = self.model
        _, layers, N = model_layers(model)
        self.layers, self.N = layers, N
        self.norm, self.head = final_norm(model), model.get_output_embeddings()
        if self.norm is None or self.head is None:
            self.status = "off: final norm or LM head not found"
            return
        hidden = int(getattr(model.config, "hidden_size", 0) or 0)
        elem = next(model.parameters()).element_size()
        need = N * self.windows.numel() * hidden * elem
        if not hidden or need > self.max_bytes:
            self.status = f"off: the cache would hold {need / 2**20:.0f} MiB (> {self.max_bytes / 2**20:.0f} MiB)"
            return
        dev = model_device(model)
        with BlockTaps(layers, keep_kwargs=True, outputs=False) as taps:
            for i in range(0, self.windows.shape[0], self.batch_size):
                model(input_ids=self.windows[i:i + self.batch_size].to(dev), use_cache=False)
                self.inputs.append(list(taps.inputs))
                self.kwargs.append(list(taps.kwargs))
        self._versions = _param_versions(model)
        self.status = "unchecked"

    def logits(self, b: int, removed: Sequence[int]) -> torch.Tensor:
        """Batch ``b``'s logits with ``removed`` (non-empty, valid) taken out, from the cache."""
        k = min(removed)
        h, _ = replay_blocks(self.layers, self.inputs[b][k], self.kwargs[b], k + 1, removed)
        return self.head(self.norm(h))

    def check(self, removed: Sequence[int]) -> bool:
        """The first removal, batch 0: the cached logits must equal the plain forward's (else the cache goes off)."""
        if self.status != "unchecked":
            return not self.status.startswith("off")
        with torch.no_grad(), without_blocks(self.model, removed):
            ref = self.model(input_ids=self.windows[:self.batch_size].to(model_device(self.model)),
                             use_cache=False).logits
        ok, err, tol = replay_matches(self.logits(0, removed), ref, "perplexity prefix cache", self.model)
        if not ok:
            self.status = f"off: cached logits differ from the plain forward by {err:.3g} > {tol:.3g}"
            self.inputs, self.kwargs = [], []
            return False
        self.status = "on"
        return True


def _param_versions(model) -> int:
    """Σ of the parameters' in-place version counters: changes whenever a parameter is modified in place."""
    return sum(int(p._version) for p in model.parameters())


def _check_windows(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a (n, seq_len ≥ 2) tensor of token ids, got shape {tuple(windows.shape)}")


@torch.no_grad()
def perplexity(model, windows: torch.Tensor | WindowCache, batch_size: int = 4,
               removed: Sequence[int] | None = None) -> dict:
    """Perplexity and next-token top-1 accuracy of ``model`` on pre-cut ``windows`` (every position after the first
    is predicted; float64 accumulation). With ``removed`` the model is evaluated without those blocks — the physically
    pruned model, in place for the call (:func:`~cbo_utils.model.blocks.without_blocks`), equal to α = 0 on them.
    ``windows`` may be a :class:`WindowCache` of ``model``: then a removal runs from its prefix cache (same answer,
    only the blocks after the first removed one recomputed; its batch size is the cache's)."""
    cache = windows if isinstance(windows, WindowCache) else None
    if cache is not None:
        windows, batch_size = cache.windows, cache.batch_size
    _check_windows(windows)
    dev = model_device(model)
    nll, correct, count = 0.0, 0, 0
    window_nll: list[float] = []  # Σ NLL of each window (the unit the paired intervals resample)
    removed = check_removal(model, removed) if removed else []
    cached = bool(removed) and cache is not None and cache.usable(model) and cache.check(removed)
    with without_blocks(model, [] if cached else removed):
        for b, i in enumerate(range(0, windows.shape[0], batch_size)):
            x = windows[i:i + batch_size].to(dev)
            logits = cache.logits(b, removed) if cached else model(input_ids=x, use_cache=False).logits
            logits = logits[:, :-1]
            logits = logits if logits.dtype == torch.float64 else logits.float()
            target = x[:, 1:].to(logits.device)
            rows = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").double().sum(1)
            window_nll += rows.cpu().tolist()
            nll += float(rows.sum())
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "accuracy": correct / count, "tokens": count,
            "seq_len": int(windows.shape[1]), "windows": int(windows.shape[0]), "window_nll": window_nll,
            "window_tokens": int(windows.shape[1]) - 1, "prefix_cache": cache.status if cache is not None else "none"}
