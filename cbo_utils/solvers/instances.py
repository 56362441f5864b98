"""Benchmark instances for the block-removal solvers: a name and a Fisher matrix ``H = AᵀA/m`` (float64).

Three sources, all giving an :class:`Instance`:

* :func:`synthetic_instance` — a gradient matrix drawn from :func:`synthetic_gradients`, a documented model of what
  real per-sample gate gradients look like (scales over orders of magnitude, a few dominant blocks, correlated late
  blocks, heavy tails), at any ``N``; deterministic for a seed;
* :func:`gradients_instance` — a gradients file this package wrote (``cbo gradients``), e.g.
  ``results/mini/smollm2/gradients.safetensors``;
* :func:`zenodo_instances` — the authors' published gradient matrices (Zenodo 10.5281/zenodo.20125262: ``.pt``
  tensors of shape 2,048 × N) in a folder you downloaded yourself. Nothing here downloads anything; torch files are
  read with ``weights_only=True`` (never an arbitrary pickle).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbo_utils.core.artifacts import PathLike, file_sha256, portable_path
from cbo_utils.gradients import GRADIENTS_FILE, load_gradients

__all__ = ["Instance", "synthetic_gradients", "synthetic_instance", "gradients_instance", "zenodo_instances",
           "fisher_matrix", "matrix_sha256"]

_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


def matrix_sha256(H: np.ndarray) -> str:
    """SHA-256 of a matrix's shape and float64 little-endian bytes (C order): identifies an instance exactly."""
    H = np.ascontiguousarray(H, dtype="<f8")
    h = hashlib.sha256(f"{H.shape}".encode())
    h.update(H.tobytes())
    return h.hexdigest()


def fisher_matrix(A: np.ndarray) -> np.ndarray:
    """``AᵀA/m`` in float64, exactly symmetric (the package's empirical Fisher)."""
    A = np.asarray(A, dtype=np.float64)
    H = A.T @ A / A.shape[0]
    return 0.5 * (H + H.T)


@dataclass(frozen=True, eq=False)
class Instance:
    """One benchmark instance: ``name`` (safe as a file name), the ``N × N`` float64 matrix ``H``, its ``source``
    (``"synthetic"``, ``"gradients"`` or ``"zenodo"``) and the ``params`` that made it (JSON-serialisable).
    ``N`` and ``sha256`` (of ``H``, see :func:`matrix_sha256`) are derived."""

    name: str
    N: int = field(init=False)
    H: np.ndarray = field(repr=False)
    source: str = "custom"
    params: dict[str, Any] = field(default_factory=dict)
    sha256: str = field(init=False, repr=False)

    def __post_init__(self):
        name = str(self.name)
        if not name or _NAME_OK.search(name):
            raise ValueError(f"instance name {name!r} must be non-empty and use only letters, digits, '.', '_' and "
                             f"'-' (it names files); e.g. {_NAME_OK.sub('_', name) or 'instance'!r}")
        H = np.array(self.H, dtype=np.float64)
        if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] < 2:
            raise ValueError(f"instance {name}: H must be a square N×N matrix with N >= 2, got shape {H.shape}")
        if not np.isfinite(H).all():
            raise ValueError(f"instance {name}: H has non-finite entries; recompute it from finite gradients")
        H.setflags(write=False)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "H", H)
        object.__setattr__(self, "N", int(H.shape[0]))
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "sha256", matrix_sha256(H))

    def record(self) -> dict[str, Any]:
        """What the provenance sidecar keeps about the instance (everything but the matrix)."""
        return {"name": self.name, "N": self.N, "source": self.source, "params": self.params, "H_sha256": self.sha256}


# --------------------------------------------------------------------------------------------------------------------
# synthetic gradients
# --------------------------------------------------------------------------------------------------------------------

def synthetic_gradients(N: int, samples: int = 2048, seed: int = 0, *, dominant: tuple[int, ...] | None = None,
                        dominant_log10_scales: tuple[float, ...] = (1.5, 1.0, 0.8), depth_decay: float = 1.5,
                        scale_noise: float = 0.3, late_fraction: float = 1 / 3, late_rank: int = 2,
                        late_correlation: float = 0.6, tail_df: float = 5.0, mean_ratio: float = 0.5) -> np.ndarray:
    """A float64 ``(samples, N)`` matrix of per-sample gate gradients shaped like real ones.

    The model (column ``i`` is block ``i``; depth ``t_i = i/(N−1)``)::

        A[s, i] = σ_i · (μ_i + z_{s,i})

    * **scales** ``σ_i``: ordinary blocks have ``log10 σ_i = clip(−depth_decay·t_i + scale_noise·ξ_i, −2.5, 0.3)``
      (``ξ_i ~ N(0,1)``): early blocks ≈ 1, late blocks ≈ 0.03, so scales span about two orders of magnitude and most
      middle/late blocks are small. The ``dominant`` blocks (default: the first two and the last, ``(0, 1, N−1)``, as
      in real LLMs where the first and last blocks are critical) get ``log10 σ = dominant_log10_scales`` (default
      1.5, 1.0, 0.8 → 32, 10, 6.3): always above every ordinary block (≤ 10^0.3 ≈ 2, and ``|μ| ≤ 1.5`` below keeps
      every ordinary ``H_ii ≤ 4·3.25 = 13 < 6.3² ≈ 40`` in expectation), so they have the largest diagonal entries;
    * **means** ``μ_i ~ N(0, mean_ratio²)`` clipped to ``±1.5`` (in units of ``σ_i``): the mean gradient ``g`` is not
      zero and has mixed signs, as measured on SmolLM2;
    * **noise** ``z``: unit-variance, heavy-ish tailed (standardised Student-t with ``tail_df`` = 5 degrees of
      freedom, excess kurtosis 6), independent across blocks — except for
    * **correlated late blocks**: the last ``ceil(late_fraction·N)`` blocks share ``late_rank`` Gaussian factors
      ``F`` (samples × r): ``z_{·,j} = √ρ · F w_j + √(1−ρ) · ε_j`` with ``ρ = late_correlation``, unit-norm loadings
      ``w_j`` whose first component is positive (``|1 + ½·N(0,1)|`` before normalising), so late blocks are
      positively correlated (mean Pearson correlation across samples ≈ ρ·w_iᵀw_j: 0.1–0.4, ≈ 0.3 for N ≥ 40; the
      means add ``±μ_iμ_j`` to the uncentred cosines ``H_ij/√(H_ii H_jj)``) while early blocks are uncorrelated.

    Deterministic for ``seed`` (``numpy.random.default_rng``; every random draw happens in a fixed order).
    """
    N, samples = int(N), int(samples)
    if N < 4:
        raise ValueError(f"synthetic_gradients needs N >= 4 blocks (got N = {N}): there are up to three dominant "
                         f"blocks plus ordinary ones")
    if samples < N:
        raise ValueError(f"samples = {samples} < N = {N}: the Fisher matrix would be rank deficient; use samples >= N "
                         f"(real gradient matrices have 2,048 samples)")
    if not 0.0 <= late_correlation < 1.0:
        raise ValueError(f"late_correlation must be in [0, 1), got {late_correlation}")
    if not 0.0 < late_fraction <= 1.0:
        raise ValueError(f"late_fraction must be in (0, 1], got {late_fraction}")
    if tail_df <= 2.0:
        raise ValueError(f"tail_df must be > 2 (finite variance), got {tail_df}")
    if late_rank < 1:
        raise ValueError(f"late_rank must be >= 1, got {late_rank}")
    dominant = (0, 1, N - 1) if dominant is None else tuple(int(b) for b in dominant)
    if len(set(dominant)) != len(dominant) or any(not 0 <= b < N for b in dominant):
        raise ValueError(f"dominant must list distinct block indices in 0..{N - 1}, got {dominant}")
    if len(dominant_log10_scales) < len(dominant):
        raise ValueError(f"dominant_log10_scales has {len(dominant_log10_scales)} entries for {len(dominant)} "
                         f"dominant blocks; give one log10 scale per dominant block")

    rng = np.random.default_rng(int(seed))
    t = np.arange(N) / (N - 1)
    log_sigma = np.clip(-depth_decay * t + scale_noise * rng.standard_normal(N), -2.5, 0.3)
    for b, s in zip(dominant, dominant_log10_scales):
        log_sigma[b] = float(s)
    sigma = 10.0 ** log_sigma
    mu = np.clip(mean_ratio * rng.standard_normal(N), -1.5, 1.5)
    z = rng.standard_t(tail_df, size=(samples, N)) * math.sqrt((tail_df - 2.0) / tail_df)
    n_late = max(1, math.ceil(late_fraction * N))
    late = np.arange(N - n_late, N)
    W = rng.standard_normal((late_rank, n_late))
    W[0] = np.abs(1.0 + 0.5 * W[0])
    W /= np.linalg.norm(W, axis=0, keepdims=True)
    F = rng.standard_normal((samples, late_rank))
    rho = float(late_correlation)
    z[:, late] = math.sqrt(rho) * (F @ W) + math.sqrt(1.0 - rho) * z[:, late]
    return (sigma * (mu + z)).astype(np.float64)


def synthetic_instance(N: int, seed: int = 0, samples: int = 2048, **model: Any) -> Instance:
    """:func:`synthetic_gradients` as an :class:`Instance` named ``synthetic-N{N}-seed{seed}`` (``H = AᵀA/samples``);
    ``model`` keywords go to :func:`synthetic_gradients` and are recorded in ``params``."""
    A = synthetic_gradients(N, samples=samples, seed=seed, **model)
    params = {"N": int(N), "samples": int(samples), "seed": int(seed), "generator": "synthetic_gradients",
              **{k: (list(v) if isinstance(v, tuple) else v) for k, v in model.items()}}
    return Instance(f"synthetic-N{int(N)}-seed{int(seed)}", fisher_matrix(A), "synthetic", params)


# --------------------------------------------------------------------------------------------------------------------
# real gradients
# --------------------------------------------------------------------------------------------------------------------

def _safe_name(text: str) -> str:
    return _NAME_OK.sub("_", text).strip("_") or "instance"


def gradients_instance(path: PathLike, name: str | None = None) -> Instance:
    """An :class:`Instance` from a gradients file this package wrote (a ``.safetensors`` file or its folder), via
    :func:`cbo_utils.gradients.load_gradients`. The name defaults to the folder holding ``gradients.safetensors``
    (``results/mini/smollm2/gradients.safetensors`` → ``smollm2``), else the file's stem."""

    path = Path(path)
    res = load_gradients(path)
    file = path / GRADIENTS_FILE if path.is_dir() else path
    if name is None:
        name = file.parent.name if file.name == GRADIENTS_FILE else file.stem
    H = res.H.detach().cpu().numpy().astype(np.float64)
    params = {"path": portable_path(file), "file_sha256": file_sha256(file), "samples": int(res.m),
              "model": (res.meta.get("parameters") or {}).get("model") or res.meta.get("model")}
    return Instance(_safe_name(str(name)), H, "gradients", params)


def _load_pt_matrix(path: Path) -> np.ndarray:
    """The 2-D gradient tensor of one published ``.pt`` file as float64 numpy, validated."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reading failure becomes one clear error naming the file
        raise ValueError(f"{path}: cannot be read as a torch tensor file with weights_only=True "
                         f"({type(exc).__name__}: {exc}). Expected a samples × N tensor of gate gradients, or a dict "
                         f"holding exactly one; re-download the file or remove it from the folder") from exc
    if isinstance(obj, dict):
        mats = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
        if len(mats) != 1:
            shapes = {str(k): (tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__)
                      for k, v in obj.items()}
            raise ValueError(f"{path}: a dict must hold exactly one 2-D tensor (the samples × N gradient matrix), "
                             f"found {len(mats)}; entries: {shapes}. Save just that tensor, or remove the others")
        key, obj = next(iter(mats.items()))
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, expected a samples × N tensor of gate gradients "
                         f"(or a dict holding exactly one)")
    if obj.dim() != 2:
        raise ValueError(f"{path}: the gradient tensor must be 2-D (samples × N blocks), got shape {tuple(obj.shape)}")
    if not (obj.is_floating_point()):
        raise ValueError(f"{path}: the gradient tensor has dtype {obj.dtype}; expected floating point gradients")
    m, N = obj.shape
    if N < 2:
        raise ValueError(f"{path}: shape {tuple(obj.shape)} has N = {N} blocks; need at least 2")
    if m < N:
        raise ValueError(f"{path}: shape {tuple(obj.shape)} has fewer samples ({m}) than blocks ({N}); the published "
                         f"matrices are samples × N (2,048 × N) — if this one is stored N × samples, transpose it")
    A = obj.detach().to(torch.float64).numpy()
    bad = ~np.isfinite(A)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))[:10].tolist()
        raise ValueError(f"{path}: {int(bad.sum())} non-finite gradient entries (first rows {rows}); the file is "
                         f"corrupt or was saved from an overflowing run — re-download it or drop those samples")
    return A


def zenodo_instances(directory: PathLike) -> list[Instance]:
    """One :class:`Instance` per ``*.pt`` file in ``directory`` (sorted by name; the instance is named after the
    file's stem): the authors' published gradient matrices (Zenodo 10.5281/zenodo.20125262 — Llama-3.1-8B,
    Llama-3.3-70B, Qwen3-14B, Nemotron; download them yourself, nothing is fetched here).

    Each file holds a ``samples × N`` tensor, or a dict with exactly one 2-D tensor; it must have ``samples >= N``
    and finite entries. ``H = AᵀA/samples`` in float64. Raises ``ValueError`` naming the file otherwise.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder; download the gradient matrices of Zenodo "
                                f"10.5281/zenodo.20125262 into a folder and pass that folder")
    files = sorted(directory.glob("*.pt"))
    if not files:
        raise ValueError(f"{directory} holds no *.pt files; put the published gradient tensors (Zenodo "
                         f"10.5281/zenodo.20125262) there")
    out = []
    for f in files:
        A = _load_pt_matrix(f)
        params = {"path": portable_path(f), "file_sha256": file_sha256(f), "samples": int(A.shape[0]),
                  "doi": "10.5281/zenodo.20125262"}
        out.append(Instance(_safe_name(f.stem), fisher_matrix(A), "zenodo", params))
    names = [i.name for i in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{directory}: file names map to the same instance names {dup}; rename the files")
    return out
