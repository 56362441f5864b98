"""Per-sample gate gradients A, the gradient g, the empirical Fisher H and the exact gate Hessian.

For calibration sample s with loss L_s (mean next-token cross-entropy over its counted tokens),

    A[s, i] = ∂L_s/∂α_i  at α = 1        (m × N)
    g       = (1/m) Σ_s A[s, :]           (∂L/∂α of the mean loss)
    H       = AᵀA / m                     (empirical Fisher, the paper's Hessian surrogate; float64)
    H_exact = (1/|S|) Σ_{s∈S} ∂²L_s/∂α²  (optional, on a subset S)

Gradients flow only into the gates (weights frozen, no weight gradients allocated). One sample per step by
default, as in the paper; ``batch_size > 1`` gives every sample its own gates in a (B, N) tensor so one backward
pass still yields per-sample rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cbo_utils.calibration import CalibrationSet
from cbo_utils.core.artifacts import atomic_write_bytes, first_line, provenance, read_json, sidecar_path, write_sidecar
from cbo_utils.model.blocks import Gates, block_types, get_adapter
from cbo_utils.model.load import model_device
from cbo_utils.model.loss import collate_samples, sample_loss

GRADIENTS_FILE = "gradients.safetensors"
log = logging.getLogger(__name__)


@dataclass
class GradientResult:
    A: torch.Tensor  # (m, N) float64: per-sample gate gradients
    g: torch.Tensor  # (N,) float64
    H: torch.Tensor  # (N, N) float64 empirical Fisher
    H_exact: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def N(self) -> int:
        return self.A.shape[1]

    @property
    def m(self) -> int:
        return self.A.shape[0]

    @classmethod
    def from_A(cls, A: torch.Tensor, H_exact=None, meta=None) -> GradientResult:
        A = torch.as_tensor(A).to(torch.float64)
        _check_matrix(A, "gradient matrix A")
        return cls(A=A, g=A.mean(0), H=fisher_from_gradients(A), H_exact=H_exact, meta=dict(meta or {}))

    @classmethod
    def from_matrix(cls, H: torch.Tensor, meta=None) -> GradientResult:
        """A given N × N matrix H (no per-sample rows: A is 0 × N, g is 0 — the Fisher energy needs only H)."""
        H = H.double()
        n = H.shape[0]
        return cls(torch.zeros(0, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), H, None, meta or {})

    def save(self, out_dir, record: dict | None = None) -> Path:
        """``out_dir/gradients.safetensors`` (arrays A, g, H[, H_exact]) + its JSON provenance sidecar."""
        from safetensors.torch import save as st_save


        out = Path(out_dir) / GRADIENTS_FILE if not str(out_dir).endswith(".safetensors") else Path(out_dir)
        tensors = {"A": self.A.contiguous(), "g": self.g.contiguous(), "H": self.H.contiguous()}
        if self.H_exact is not None:
            tensors["H_exact"] = self.H_exact.contiguous()
        atomic_write_bytes(out, st_save(tensors, metadata={"format": "cbo_utils.gradients/1"}))
        write_sidecar(out, {**(record or {}), **self.meta})
        return out


def fisher_from_gradients(A: torch.Tensor) -> torch.Tensor:
    """Empirical Fisher ``AᵀA/m`` in float64, exactly symmetric."""
    A = A.to(torch.float64)
    H = A.T @ A / A.shape[0]
    return (H + H.T) / 2  # exactly symmetric


def _check_matrix(A: torch.Tensor, what: str) -> None:
    if A.dim() != 2:
        raise ValueError(f"{what} must be 2-D (samples × blocks); got shape {tuple(A.shape)}")
    if A.shape[0] < 1 or A.shape[1] < 2:
        raise ValueError(f"{what} has shape {tuple(A.shape)}: need at least one sample and two blocks")
    bad = ~torch.isfinite(A)
    if bad.any():
        rows = torch.nonzero(bad.any(1)).flatten()[:10].tolist()
        raise ValueError(f"{what} has {int(bad.sum())} non-finite entries (first rows {rows}); recompute the "
                         "gradients with float32 weights (bf16/fp16 can overflow) or drop those samples")


def _check_real(path, what: str, t: torch.Tensor) -> None:
    """Refuse a complex or non-numeric tensor: gate gradients and Hessians are real, and casting would drop the
    imaginary part without a word."""
    if t.is_complex():
        raise ValueError(f"{path}: {what} is complex ({str(t.dtype).removeprefix('torch.')}); gate gradients and "
                         "Hessians are real numbers and cbo does not silently drop an imaginary part — save the real "
                         "tensor (e.g. A.real, if that is what it means)")
    if t.dtype == torch.bool:
        raise ValueError(f"{path}: {what} holds booleans, not numbers; save the m × N gradients (or N × N matrix) as "
                         "floats")


def load_gradients(path, kind: str | None = None) -> GradientResult:
    """Load A, g, H (and H_exact) from a folder or ``.safetensors`` written by this package, or the authors'
    published torch tensors (``.pt``: an m × N tensor, or a dict holding one), read with ``weights_only=True``.

    ``kind`` says what a ``.pt`` tensor holds: ``"gradients"`` (m × N rows of per-sample gate gradients; the default
    for a non-square tensor) or ``"matrix"`` (an N × N matrix H itself). A square tensor is ambiguous — m = N samples
    of gradients or a matrix — and is refused unless ``kind`` says which. Unreadable files raise ``ValueError``
    naming the file."""
    path = Path(path)
    if kind not in (None, "gradients", "matrix"):
        raise ValueError(f"kind must be 'gradients' or 'matrix', got {kind!r}")
    if path.is_dir():
        path = path / GRADIENTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no gradient file at {path}; run `cbo gradients` first or give the .safetensors/.pt "
                                "file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            t = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file ({first_line(exc)[:100]}); it is "
                             "empty, truncated or of another format — write it again with `cbo gradients`") from None
        if "A" not in t:
            raise ValueError(f"{path} has no array named 'A' (found {sorted(t)}); it is not a gradient file of "
                             "`cbo gradients`")
        _check_real(path, "'A'", t["A"])
        if t["A"].dim() != 2 or not torch.isfinite(t["A"]).all():
            raise ValueError(f"{path}: 'A' must be a finite m × N matrix, got shape {tuple(t['A'].shape)}"
                             + ("" if t["A"].dim() != 2 else " with non-finite entries"))
        if t.get("H_exact") is not None:
            H_ex, n = t["H_exact"], t["A"].shape[1]
            _check_real(path, "'H_exact'", H_ex)
            if tuple(H_ex.shape) != (n, n) or not torch.isfinite(H_ex).all():
                raise ValueError(f"{path}: 'H_exact' must be a finite {n} × {n} matrix (N = {n} blocks, from 'A'), got "
                                 f"shape {tuple(H_ex.shape)}" + ("" if tuple(H_ex.shape) != (n, n)
                                                                else " with non-finite entries"))
        meta = read_json(sidecar_path(path)) if sidecar_path(path).exists() else {}
        res = GradientResult.from_A(t["A"], H_exact=t.get("H_exact"), meta=meta)
        return res
    if path.suffix in (".pt", ".pth", ".bin"):
        import pickle

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
        except pickle.UnpicklingError:
            raise ValueError(f"{path} holds Python objects beyond tensors, which cbo does not unpickle (loading them "
                             "could run code); save the m × N tensor alone (torch.save(A, path)) or as safetensors") \
                from None
        except Exception as exc:  # noqa: BLE001 — torch raises RuntimeError, EOFError, IndexError, ... on bad bytes
            raise ValueError(f"{path} is not a readable torch file ({first_line(exc)[:100]}); it is empty, "
                             "truncated or of another format") from None
        if isinstance(obj, dict):
            cands = [obj[k] for k in ("A", "grads", "gradients", "grad_matrix") if k in obj] or [
                v for v in obj.values() if isinstance(v, torch.Tensor) and v.dim() == 2]
            if not cands:
                raise ValueError(f"{path} holds a dict without a 2-D tensor (keys: {sorted(obj)})")
            obj = cands[0]
        if not isinstance(obj, torch.Tensor) or obj.dim() != 2:
            what = f"a {obj.dim()}-D tensor" if isinstance(obj, torch.Tensor) else f"a {type(obj).__name__}"
            raise ValueError(f"{path} holds {what}; expected an m × N tensor of gate gradients (or, with kind "
                             "'matrix' / --input-kind matrix, an N × N matrix)")
        _check_real(path, "the tensor", obj)
        if not torch.isfinite(obj).all():
            raise ValueError(f"{path} has non-finite entries (NaN or inf)")
        m, n = obj.shape
        if kind is None and m == n:
            raise ValueError(f"{path} holds a square {m} × {n} tensor: m = N samples of gate gradients, or the matrix "
                             "H itself? Say which (`cbo solve --input-kind gradients|matrix`, or kind=)")
        if kind == "matrix":
            if m != n:
                raise ValueError(f"{path} holds a {m} × {n} tensor, not the N × N matrix that kind 'matrix' says")
            H = obj.double()
            if not torch.allclose(H, H.T, rtol=1e-6, atol=1e-12 * float(H.abs().max() or 1)):
                raise ValueError(f"{path}: the matrix is not symmetric; give a symmetric N × N Hessian surrogate")
            return GradientResult.from_matrix(H, meta={"source": str(path), "foreign": True, "input_kind": "matrix"})
        return GradientResult.from_A(obj.float().double(), meta={"source": str(path), "foreign": True})
    raise ValueError(f"unknown gradient file type {path.suffix!r}: use a folder, .safetensors or .pt")


def _batches(indices: Sequence[int], batch_size: int):
    for i in range(0, len(indices), batch_size):
        yield indices[i:i + batch_size]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def collect_gate_gradients(model, calibration: CalibrationSet | Sequence[dict], *, batch_size: int = 1,
                           response_only: bool = False, exact_hessian_samples: int | Sequence[int] = 0,
                           gradient_checkpointing: bool = False, progress: bool = True, accelerator=None,
                           pad_token_id: int | None = None, checkpoint=None, checkpoint_every: int = 32,
                           removed: Sequence[int] = (), random_removal: tuple[int, int] | None = None,
                           points_per_sample: int = 1, seed: int = 0) -> GradientResult:
    """Collect A (m × N), g, the Fisher H and optionally the exact Hessian (see the module docstring).

    ``exact_hessian_samples``: an int K (the first K samples) or explicit sample indices for ``H_exact``.
    ``accelerator``: an ``accelerate.Accelerator``; with several processes each takes every world-th sample and
    the rows are gathered back in calibration order (identical to one process).
    ``checkpoint``: a file prefix; the rows done so far are saved there every ``checkpoint_every`` samples (one
    file per process), and a rerun on the same model, calibration and options resumes from them. The files are
    deleted when the collection finishes.
    ``removed``: blocks already taken out (α = 0 there): the gradients are those of the shrunken model, for
    iterative selection without copying the model. Their columns are the derivatives for putting a block back.
    ``random_removal=(lo, hi)``: the *stochastic-depth* gradients — each row is taken at its own random point: a
    uniformly drawn count k ∈ [lo, hi] of blocks (uniform k-subset of the blocks not in ``removed``, seeded by
    ``seed``) gated off in addition to ``removed``. ``points_per_sample`` rows per sample (A gets m·points rows,
    ordered point-major: all samples at their first point, then at their second, ...). The drawn sets are recorded
    in ``meta["random_points"]``. H = AᵀA/m is then the Fisher averaged over partially removed models (see
    :mod:`cbo_utils.select.cbo`).
    """
    from tqdm.auto import tqdm

    samples = list(calibration)
    if not samples:
        raise ValueError("the calibration set is empty")
    adapter = get_adapter(model)
    N = len(adapter.layers(model))
    removed = sorted(int(b) for b in removed)
    points = _random_points(N, len(samples), removed, random_removal, points_per_sample, seed)
    if points is not None:
        samples = samples * points_per_sample
    m = len(samples)
    dev = model_device(model)
    pad = pad_token_id if pad_token_id is not None else (getattr(model.config, "pad_token_id", None) or 0)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(range(rank, m, world))
    rows = torch.zeros((len(mine), N), dtype=torch.float64)
    losses = torch.zeros(len(mine), dtype=torch.float64)
    ckpt = Path(f"{checkpoint}.rank{rank}-of-{world}.safetensors") if checkpoint else None
    key = _resume_key(model, samples, N, response_only, (batch_size, removed, points)) if ckpt else ""
    start = _load_partial(ckpt, key, rows, losses) if ckpt else 0
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with _checkpointing(model, gradient_checkpointing), Gates(model, adapter=adapter) as gates:
        bar = tqdm(total=len(mine), initial=start, desc="gate gradients", unit="sample",
                   disable=not progress or rank != 0)
        pos, last_saved = start, start
        for idx in _batches(mine[start:], batch_size):
            rows[pos:pos + len(idx)], losses[pos:pos + len(idx)] = _gate_gradient_batch(
                model, gates, samples, idx, N, removed, points, dev, pad, response_only)
            pos += len(idx)
            bar.update(len(idx))
            if ckpt and pos - last_saved >= checkpoint_every and pos < len(mine):
                _save_partial(ckpt, key, rows, losses, pos)
                last_saved = pos
        bar.close()
        t_grad = time.perf_counter() - t0
        H_exact, t_hess, hess_idx = None, 0.0, []
        if exact_hessian_samples:
            hess_idx = (list(range(min(int(exact_hessian_samples), m))) if isinstance(exact_hessian_samples, int)
                        else list(exact_hessian_samples))
            t1 = time.perf_counter()
            H_exact = exact_gate_hessian(model, [samples[i] for i in hess_idx], gates=gates,
                                         response_only=response_only, progress=progress and rank == 0)
            t_hess = time.perf_counter() - t1

    if world > 1:
        rows, losses = _gather_rows(accelerator, rows, losses, m)
    if ckpt and ckpt.exists():
        ckpt.unlink()
    A = rows
    meta = {
        "samples": m, "blocks": N, "removed_blocks": removed, "block_types": block_types(model),
        "hybrid": bool(get_adapter(model).hybrid), "tokens": int(sum(
            s["input_ids"].numel() for s in samples)), "response_only": response_only, "batch_size": batch_size,
        "gradient_checkpointing": gradient_checkpointing, "model_dtype": str(next(model.parameters()).dtype),
        "gate_dtype": "float32", "accumulation_dtype": "float64", "device": str(dev), "processes": world,
        "seconds_gradients": round(t_grad, 3),
        "seconds_per_sample": round(t_grad / max(len(mine) - start, 1), 4), "resumed_from_sample": start,
        "exact_hessian_samples": hess_idx, "seconds_exact_hessian": round(t_hess, 3),
        "peak_rss_gb": round(_peak_rss_gb(), 3), "mean_loss": float(losses.mean()),
        "sample_losses": [round(float(x), 6) for x in losses],
    }
    if points is not None:
        meta.update(random_removal=list(random_removal), points_per_sample=points_per_sample, seed=seed,
                    random_points=points)
    if dev.type == "cuda":
        meta["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1024**3, 3)
    if isinstance(calibration, CalibrationSet):
        meta["calibration"] = calibration.describe()
    return GradientResult.from_A(A, H_exact=H_exact, meta=meta)


@contextlib.contextmanager
def _checkpointing(model, enabled: bool):
    """Activation checkpointing for the duration (HF checkpoints only in training mode; the supported models have
    no active dropout there); the training mode is restored afterwards."""
    was_training = model.training
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    try:
        yield
    finally:
        if enabled:
            model.gradient_checkpointing_disable()
        model.train(was_training)


def _gate_gradient_batch(model, gates: Gates, samples, idx: Sequence[int], N: int, removed: Sequence[int],
                         points, dev, pad: int, response_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gate gradients (B × N, float64) and losses of the samples ``idx``, each at its own gates (α = 0
    on ``removed`` and on the sample's random point)."""
    ids, att, msk = collate_samples(samples, idx, dev, pad, response_only)
    alpha = torch.ones((len(idx), N), dtype=torch.float32, device=dev)
    alpha[:, removed] = 0.0
    if points is not None:
        for r, i in enumerate(idx):
            alpha[r, points[i]] = 0.0
    alpha.requires_grad_(True)
    gates.alpha = alpha
    loss = sample_loss(model, ids, msk, att)
    (grad,) = torch.autograd.grad(loss.sum(), alpha)
    return grad.double().cpu(), loss.detach().double().cpu()


def _random_points(N: int, m: int, removed: Sequence[int], random_removal, points_per_sample: int, seed: int
                   ) -> list[list[int]] | None:
    """The random extra removals of the stochastic-depth gradients (one list per row), or None when off."""
    if random_removal is None:
        if points_per_sample != 1:
            raise ValueError("points_per_sample > 1 only makes sense with random_removal=(lo, hi)")
        return None
    import numpy as np

    lo, hi = (int(x) for x in random_removal)
    free = [i for i in range(N) if i not in set(removed)]
    if not 0 <= lo <= hi <= len(free) - 1:
        raise ValueError(f"random_removal=({lo}, {hi}) must satisfy 0 <= lo <= hi < {len(free)} (the blocks left); "
                         "e.g. (0, M) for a removal of M blocks")
    if points_per_sample < 1:
        raise ValueError("points_per_sample must be at least 1")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(m * points_per_sample):
        k = int(rng.integers(lo, hi + 1))
        out.append(sorted(int(b) for b in rng.choice(free, size=k, replace=False)))
    return out


def _resume_key(model, samples, N, response_only, batch_size) -> str:
    """What must match for partial rows to be reused: model identity, calibration tokens and options."""
    import hashlib

    h = hashlib.sha256()
    h.update(json.dumps([getattr(model.config, "_name_or_path", ""), type(model).__name__, N, response_only,
                         batch_size, str(next(model.parameters()).dtype)]).encode())
    for p in list(model.parameters())[:2] + list(model.parameters())[-2:]:  # cheap fingerprint of the weights
        h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    for s in samples:
        h.update(s["input_ids"].to(torch.int64).numpy().tobytes())
        h.update(s["loss_mask"].to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save_partial(path: Path, key: str, rows, losses, done: int) -> None:
    from safetensors.torch import save as st_save


    atomic_write_bytes(path, st_save({"rows": rows[:done].contiguous(), "losses": losses[:done].contiguous()},
                                     metadata={"key": key, "done": str(done)}))


def _load_partial(path: Path, key: str, rows, losses) -> int:
    """Fill ``rows``/``losses`` from a partial file of the same collection; return how many are done."""
    if not path.is_file():
        return 0
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                log.warning("ignoring %s: it belongs to another model, calibration set or option set", path)
                return 0
            done = int(meta["done"])
            rows[:done] = f.get_tensor("rows")
            losses[:done] = f.get_tensor("losses")
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ValueError(f"the partial gradient file {path} (of an interrupted run) is corrupt ({str(exc)[:80]}); "
                         f"delete it to start the collection over: rm '{path}'") from None
    log.info("resuming gate gradients from sample %d (%s)", done, path)
    return done


def _gather_rows(accelerator, rows: torch.Tensor, losses: torch.Tensor, m: int):
    """Rows of every process back in calibration order (process r holds samples r, r + world, ...)."""
    world = accelerator.num_processes
    per = math.ceil(m / world)
    dev = accelerator.device
    buf = torch.zeros((per, rows.shape[1] + 1), dtype=torch.float64, device=dev)
    buf[: rows.shape[0], :-1] = rows.to(dev)
    buf[: rows.shape[0], -1] = losses.to(dev)
    allb = accelerator.gather(buf[None]).reshape(world, per, -1).cpu()  # (world, per, N+1)
    out = torch.zeros((m, rows.shape[1] + 1), dtype=torch.float64)
    for r in range(world):
        idx = list(range(r, m, world))
        out[idx] = allb[r, : len(idx)]
    return out[:, :-1], out[:, -1]


def exact_gate_hessian(model, samples: Sequence[dict], gates: Gates | None = None, response_only: bool = False,
                       progress: bool = False) -> torch.Tensor:
    """Exact ∂²L/∂α² of the mean loss over ``samples`` at α = 1 (N × N, float64), by N Hessian-vector products
    (double backward) per sample."""
    from tqdm.auto import tqdm

    own = gates is None
    gates = gates or Gates(model).attach()
    dev = model_device(model)
    N = gates.n
    H = torch.zeros((N, N), dtype=torch.float64)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        # the math SDPA kernel is the one with a double backward (flash/efficient kernels have none)
        with sdpa_kernel([SDPBackend.MATH]):
            _hessian_rows(model, samples, gates, H, dev, response_only, tqdm, progress)
    finally:
        if own:
            gates.detach()
        else:
            gates.reset()
    H /= len(samples)
    return (H + H.T) / 2


def _hessian_rows(model, samples, gates, H, dev, response_only, tqdm, progress):
    N = gates.n
    for s in tqdm(samples, desc="exact Hessian", unit="sample", disable=not progress):
        alpha = torch.ones(N, dtype=torch.float32, device=dev, requires_grad=True)
        gates.alpha = alpha
        ids = s["input_ids"].to(dev)
        msk = s["loss_mask"].to(dev) if response_only else None
        loss = sample_loss(model, ids, msk)[0]
        (grad,) = torch.autograd.grad(loss, alpha, create_graph=True)
        for i in range(N):  # row i of the Hessian = ∂(∂L/∂α_i)/∂α
            (row,) = torch.autograd.grad(grad[i], alpha, retain_graph=i < N - 1)
            H[i] += row.double().cpu()


def gradients_provenance(model_spec: str, calibration: CalibrationSet, seed: int, **params) -> dict:
    return provenance("gate_gradients", {"model": model_spec, "seed": seed, **params},
                      calibration=calibration.describe())

