"""The CBO energies, by name: how the quadratic form ``E(x) = xᵀQx + const`` of a removal ``x`` is built from the
gradients artifact (the Hessian surrogate ``H`` and, where needed, the mean gate gradient ``g``).

A new energy is one :func:`register_energy` call: its name, whether it needs ``g``, the function ``(H, g) -> (Q,
const)`` and a label for figures. ``pairs`` is built from the measured pair table instead of the gradients
(``source="pairs"``, :mod:`cbo_utils.interactions`). Everything downstream (the problem, the solvers, the bounds,
the exports, the comparison, the command line's ``--energy``) reads this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Energy:
    name: str
    needs_g: bool
    build: Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, float]]  # (H, g) -> (Q, const), float64
    label: str = ""  # the formula as figures print it (matplotlib mathtext)
    description: str = ""
    #: the artifact Q is built from: "gradients" (H, g of the gate gradients) or "pairs" (the measured pair table,
    #: :mod:`cbo_utils.interactions`, whose matrix is passed as H)
    source: str = "gradients"


ENERGIES: dict[str, Energy] = {}


def register_energy(name: str, build, *, needs_g: bool = False, label: str = "", description: str = "",
                    source: str = "gradients", override: bool = False) -> Energy:
    """Add an energy to :data:`ENERGIES` (``build(H, g) -> (Q, const)``; ``g`` is None unless ``needs_g``)."""
    key = str(name).lower()
    if key in ENERGIES and not override:
        raise ValueError(f"an energy named {key!r} is already registered; pass override=True to replace it")
    if source not in ("gradients", "pairs"):
        raise ValueError(f"source must be 'gradients' or 'pairs', got {source!r}")
    ENERGIES[key] = Energy(key, needs_g, build, label or key, description, source)
    return ENERGIES[key]


def get_energy(name: str) -> Energy:
    key = str(name).lower()
    if key not in ENERGIES:
        raise ValueError(f"unknown energy {name!r}: choose one of "
                         + ", ".join(f"'{e.name}' ({e.description})" for e in ENERGIES.values()))
    return ENERGIES[key]


def gradient_energy(name: str) -> Energy:
    """The energy ``name``, refusing one that is not built from gate gradients (the pair energy needs its table)."""
    e = get_energy(name)
    if e.source != "gradients":
        raise ValueError(f"the energy {e.name!r} is built from a measured pair table ({e.description}), not from gate "
                         "gradients: use a CBO variant that measures it (cbo-pairs, cbo-pairs-rerank, cbo-pairs-refit)")
    return e


def energy_gradient(name: str, g):
    """``g`` when the energy ``name`` uses the gate gradient, else None (what to pass on as ``g``)."""
    return g if get_energy(name).needs_g else None


def _check_g(g, N: int) -> np.ndarray:
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    if g.shape[0] != N:
        raise ValueError(f"g has {g.shape[0]} entries but H is {N}×{N}: g needs one entry per block")
    bad = ~np.isfinite(g)
    if bad.any():
        raise ValueError(f"g has non-finite values at blocks {np.flatnonzero(bad).tolist()[:10]}; recompute the "
                         f"gradient (float64 accumulation) or exclude these blocks")
    return g


def _fisher(H, g):
    return H, 0.0


def _taylor(H, g):
    return 0.5 * H - np.diag(_check_g(g, H.shape[0])), 0.0


register_energy("fisher", _fisher, label=r"$E(x) = x^\top H x$", description="xᵀHx, the paper's energy")
register_energy("taylor", _taylor, needs_g=True, label=r"$E(x) = -g^\top x + \frac{1}{2}x^\top H x$",
                description="−gᵀx + ½xᵀHx, with the first-order term; −gᵀx = −xᵀdiag(g)x on binary x")


def _pairs(P, g):
    return P, 0.0


register_energy("pairs", _pairs, label=r"$E(x) = \sum_i h_i x_i + \sum_{i<j} J_{ij} x_i x_j$ (measured)",
                description="measured h_i = D({i}) − D(∅), J_ij = D({i,j}) − D({i}) − D({j}) + D(∅); exact on every "
                            "set of ≤ 2 blocks", source="pairs")
