"""The hybrid stand-in: a NemotronH model with the Nano's 52-layer Mamba/MoE/attention pattern at hidden size 64,
trained briefly on SciQ text and cached atomically in ``$CBO_CACHE`` — what the tiny and mini profiles use in place of
Nemotron-3-Nano-30B-A3B (its config says so).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cbo_utils.calibration import sciq_conversations
from cbo_utils.core import tempfiles
from cbo_utils.core.artifacts import (
    provenance,
    read_json,
    write_json,
)
from cbo_utils.model.blocks import pattern_types
from cbo_utils.model.load import cache_dir
from cbo_utils.model.tiny import build_tokenizer, tiny_nemotron_h

#: The layer pattern of NVIDIA-Nemotron-3-Nano-30B-A3B (M Mamba2, E MoE, * attention; attention at 5, 12, 19, 26,
#: 33, 42).
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


#: The checkpoint the stand-in stands in for.
NANO_MODEL_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B"


STANDIN_NOTE = (f"This model is a stand-in for {NANO_MODEL_ID}: a small NemotronH with the same layer pattern, "
                "built in code and trained briefly on SciQ text on a CPU. Its numbers exercise the method and the "
                "pipeline; they are not results about the real model.")


STANDIN_PREFIX = "standin-nemotron-h"


STANDIN_INFO = "standin_info.json"


_STANDIN_FORMAT = 1  # bump when the training recipe changes: old caches are then not reused


def sciq_plain_texts(split: str = "calibration", seed: int = 0) -> list[str]:
    """The SciQ chats of :func:`cbo_utils.calibration.sciq_conversations` as plain text, one string per conversation:
    question, support paragraph and answer on their own lines — the same rendering as
    ``calibration.embedded(..., chat=False)``. ``split``: ``calibration`` or ``heldout`` (disjoint by question)."""

    return ["\n".join(t["content"] for t in conv) for conv in sciq_conversations(split, seed=seed)]


def standin_settings(pattern: str = NANO_PATTERN, hidden: int = 64, steps: int = 300, seq_len: int = 128,
                     batch_size: int = 8, lr: float = 3e-3, seed: int = 0) -> dict[str, Any]:
    """Every setting that determines the stand-in's weights (the cache key hashes this dict)."""
    pattern_types(pattern)
    for name, v in (("hidden", hidden), ("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "steps" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'steps' else 'positive'} integer, "
                             f"got {v!r}")
    if hidden % 4:
        raise ValueError(f"hidden must be a multiple of 4 (4 attention heads), got {hidden}")
    if seq_len < 8:
        raise ValueError(f"seq_len must be at least 8 tokens, got {seq_len}")
    if not (isinstance(lr, (int, float)) and 0 < float(lr) < 1):
        raise ValueError(f"lr must be a learning rate in (0, 1), got {lr!r}")
    return {"format": _STANDIN_FORMAT, "pattern": pattern, "hidden": int(hidden), "steps": int(steps),
            "seq_len": int(seq_len), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
            "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.01), grad clip 1.0",
            "schedule": "linear warm-up over 10% of the steps, cosine decay to 10%",
            "data": "SciQ calibration pool (sciq_conversations('calibration', seed=0)) as plain text, random windows "
                    "of seq_len tokens starting with BOS", "vocab_size": 512, "experts_per_token": 2}


def _settings_hash(settings: Mapping[str, Any]) -> str:
    """Short SHA-256 of the settings (key-sorted JSON): the stand-in's cache key."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _token_stream(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """The texts joined by blank lines and tokenised once (no special tokens), as one long id tensor."""
    return torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)


def _training_windows(stream: torch.Tensor, bos: int, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` windows: BOS + ``seq_len − 1`` consecutive tokens from random offsets of ``stream``."""
    body = seq_len - 1
    if stream.numel() <= body:
        raise ValueError(f"the training text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    offs = torch.randint(0, stream.numel() - body, (n,), generator=gen)
    rows = torch.stack([stream[o:o + body] for o in offs.tolist()])
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], dim=1)


def _lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on the token windows ``x`` (every position after the first)."""
    logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), x[:, 1:])


def _write_info(folder: Path, info: dict) -> None:
    """Write the stand-in's info JSON into its (temporary) cache folder."""
    write_json(folder / STANDIN_INFO, info)


def standin_nemotron_h(pattern: str = NANO_PATTERN, hidden: int = 64, steps: int = 300, seq_len: int = 128,
                       batch_size: int = 8, lr: float = 3e-3, seed: int = 0, cache: bool = True,
                       progress: bool = True, cache_root: str | os.PathLike | None = None):
    """A NemotronH stand-in for NVIDIA-Nemotron-3-Nano-30B-A3B: ``(model, tokenizer, info)``.

    Built with :func:`cbo_utils.model.tiny.tiny_nemotron_h` (``pattern``, ``hidden``, ``seed``; byte-level BPE tokenizer
    from :func:`cbo_utils.model.tiny.build_tokenizer`; 4 routed experts, top-2, plus a shared expert) and trained for
    ``steps`` AdamW steps of plain next-token cross-entropy on ``batch_size`` random windows of ``seq_len`` tokens of
    the SciQ *calibration* pool rendered as plain text (:func:`sciq_plain_texts`), seeded and deterministic on a
    given machine. The SciQ *held-out* pool never enters training; the info records the held-out loss before and
    after training.

    With ``cache=True`` the trained model is a ``save_pretrained`` folder (plus tokenizer and ``standin_info.json``)
    at ``cache_root / "standin-nemotron-h-<hash of all settings>"`` (``cache_root`` defaults to
    :func:`cbo_utils.model.load.cache_dir`); a second call loads it (``info["loaded_from_cache"]``). The folder is
    written under a temporary name and renamed when complete, so an interrupted training leaves no half cache.

    ``info``: ``stand_in: true``, ``note`` (what it stands in for), ``settings``, ``settings_hash``, ``path``,
    ``loss_first``/``loss_last`` (mean of the first/last 10 training steps, fewer when
    there are fewer than 20), ``heldout_loss_untrained`` /
    ``heldout_loss_trained``, ``tokens_seen``, ``seconds``, ``parameters``.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer


    settings = standin_settings(pattern, hidden, steps, seq_len, batch_size, lr, seed)
    h = _settings_hash(settings)
    if cache:

        root = Path(cache_root) if cache_root is not None else cache_dir()
        target = root / f"{STANDIN_PREFIX}-{h}"
        if (target / STANDIN_INFO).is_file() and (target / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(target)
            model.config.cbo_stand_in_for = NANO_MODEL_ID
            info = read_json(target / STANDIN_INFO)
            info.update(loaded_from_cache=True, path=str(target))
            return model, tok, info

    t0 = time.perf_counter()
    tok = build_tokenizer()
    model, _ = tiny_nemotron_h(pattern, hidden=hidden, seed=seed, tokenizer=tok)
    model = model.float()
    stream = _token_stream(tok, sciq_plain_texts("calibration"))
    held = _token_stream(tok, sciq_plain_texts("heldout"))
    n_held = max(1, min(8, held.numel() // seq_len))
    body = seq_len - 1
    held_windows = torch.cat([torch.full((n_held, 1), tok.bos_token_id, dtype=torch.long),
                              held[: n_held * body].view(n_held, body)], dim=1)

    @torch.no_grad()
    def heldout_loss() -> float:
        """Mean next-token loss on the SciQ held-out windows (eval mode)."""
        model.eval()
        return float(_lm_loss(model, held_windows))

    loss_untrained = heldout_loss()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 10)

    def lr_at(step: int) -> float:
        """Learning rate of a step: linear warm-up, then cosine decay to 10%."""
        if step < warm:
            return lr * (step + 1) / warm
        p = (step - warm) / max(1, steps - warm)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="train stand-in", unit="step", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = _training_windows(stream, tok.bos_token_id, batch_size, seq_len, gen)
        loss = _lm_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    model.config.cbo_stand_in_for = NANO_MODEL_ID  # saved into config.json: a loaded copy says what it is
    loss_trained = heldout_loss()
    seconds = time.perf_counter() - t0
    w = max(1, min(10, len(losses) // 2))  # disjoint windows when there are at least two steps
    head, tail = losses[:w], losses[-w:]
    info = {
        "stand_in": True, "stands_in_for": NANO_MODEL_ID, "note": STANDIN_NOTE, "settings": settings,
        "settings_hash": h, "loss_first": float(np.mean(head)) if head else None,
        "loss_last": float(np.mean(tail)) if tail else None, "losses_every_10": losses[::10],
        "heldout_loss_untrained": loss_untrained, "heldout_loss_trained": loss_trained,
        "heldout_loss_windows": f"{n_held} × {seq_len} tokens of the SciQ held-out pool",
        "tokens_seen": int(steps * batch_size * seq_len), "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(steps, 1), 4), "threads": torch.get_num_threads(),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "provenance": provenance("standin_nemotron_h", settings), "loaded_from_cache": False, "path": None,
    }
    if cache:
        root.mkdir(parents=True, exist_ok=True)
        tempfiles.clean_stale(target)
        tmp = tempfiles.temp_dir(target)
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _write_info(tmp, {**info, "path": str(target)})
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished the same stand-in first: use its copy
                if not (target / STANDIN_INFO).is_file():
                    raise
        except BaseException:
            tempfiles.discard(tmp)
            raise
        tempfiles.discard(tmp)   # nothing left when it was renamed; the other process's copy is used otherwise
        info["path"] = str(target)
    return model, tok, info
