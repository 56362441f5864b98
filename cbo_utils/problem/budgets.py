"""Per-type budgets for hybrid models ("remove 2 MoE and 1 Mamba block"): parsing and labels, and the problem with
one cardinality constraint per block type.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cbo_utils.model.blocks import ATTENTION
from cbo_utils.problem.ising import BlockRemovalProblem


def normalise_budget(budget: Mapping[str, int] | str) -> dict[str, int]:
    """A budget as a dict ``{type: count}`` sorted by type name, zero counts dropped; validated.

    Accepts a mapping (``{"moe": 1, "mamba": 1}``) or a label (``"moe:1+mamba:1"``, see :func:`budget_label`).
    """
    if isinstance(budget, str):
        return parse_budget(budget)
    if not isinstance(budget, Mapping):
        raise ValueError(f"a budget maps block types to counts, e.g. {{'moe': 3}}; got {budget!r}")
    out: dict[str, int] = {}
    for t, c in budget.items():
        if not isinstance(t, str) or not t:
            raise ValueError(f"budget keys must be block type names (mamba, moe, attention, mlp, decoder); got {t!r}")
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            if isinstance(c, (float, np.floating)) and float(c).is_integer():
                c = int(c)
            else:
                raise ValueError(f"budget count for {t!r} must be a non-negative integer, got {c!r}")
        if c < 0:
            raise ValueError(f"budget count for {t!r} must be >= 0, got {c}")
        if c:
            out[t] = int(c)
    if not out:
        raise ValueError(f"the budget {dict(budget)!r} removes nothing; give at least one positive count")
    return dict(sorted(out.items()))


def budget_label(budget: Mapping[str, int] | str) -> str:
    """Canonical label of a budget: ``{"moe": 1, "mamba": 1}`` → ``"mamba:1+moe:1"``; ``{"moe": 3}`` → ``"moe:3"``."""
    return "+".join(f"{t}:{c}" for t, c in normalise_budget(budget).items())


def parse_budget(label: str) -> dict[str, int]:
    """Inverse of :func:`budget_label` (also accepts ``,`` as separator): ``"moe:3"`` → ``{"moe": 3}``."""
    out: dict[str, int] = {}
    for part in re.split(r"[+,]", label.strip()):
        name, sep, num = part.strip().partition(":")
        if not sep or not name or not num.strip().isdigit():
            raise ValueError(f"bad budget {label!r}: write TYPE:COUNT joined by '+', e.g. 'moe:3' or 'moe:1+mamba:1'")
        if name.strip() in out:
            raise ValueError(f"budget {label!r} names {name.strip()!r} twice")
        out[name.strip()] = int(num)
    return normalise_budget(out)


def check_budget(types: Sequence[str], budget: dict[str, int], keep: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Per-type candidate blocks (not in ``keep``) for a normalised budget; clear errors for impossible budgets.

    Rules: every budget type exists in the model; it has enough removable blocks; and a hybrid model keeps at least
    one attention block (cached generation needs it, see :func:`cbo_utils.model.blocks.check_removal`).
    """
    types = [str(t) for t in types]
    keep = set(int(b) for b in keep)
    known = sorted(set(types))
    cands: dict[str, np.ndarray] = {}
    for t, c in budget.items():
        if t not in known:
            raise ValueError(f"budget type {t!r} does not occur in this model; its block types are {known}")
        cand = np.array([i for i, tt in enumerate(types) if tt == t and i not in keep], dtype=np.int64)
        if c > len(cand):
            raise ValueError(f"the budget removes {c} {t} blocks but only {len(cand)} are removable "
                             f"({sum(1 for x in types if x == t)} in the model, {len(keep)} kept); lower the count")
        cands[t] = cand
    n_att = sum(1 for t in types if t == ATTENTION)
    if ATTENTION in budget and set(types) - {"decoder"} and budget[ATTENTION] >= n_att:
        raise ValueError(f"the budget removes {budget[ATTENTION]} attention blocks but the model has only {n_att}: "
                         "at least one attention block must remain in a hybrid model (cached generation needs it)")
    if sum(budget.values()) >= len(types):
        raise ValueError(f"the budget removes {sum(budget.values())} of {len(types)} blocks; leave at least one")
    return cands


@dataclass(eq=False)
class TypeBudgetProblem:
    """Remove, for every block type ``t`` of ``budget``, exactly ``budget[t]`` blocks of type ``t`` (none of
    ``keep``), minimising ``xᵀQx + const``.

    ``base`` is the equivalent :class:`~cbo_utils.problem.ising.BlockRemovalProblem` without the per-type counts (``M``
    = total, ``only_types`` = the budget's types, ``keep``): single-type budgets are exactly that problem; mixed ones
    add the per-type counts, which :meth:`feasible` checks.
    """

    Q: np.ndarray = field(repr=False)
    block_types: list[str]
    budget: dict[str, int]
    const: float = 0.0
    keep: tuple[int, ...] = ()
    energy: str = "fisher"
    candidates: dict[str, np.ndarray] = field(init=False, repr=False)
    base: Any = field(init=False, repr=False)

    def __post_init__(self):
        """Normalise and validate the budget, build :attr:`base` and the per-type candidates."""

        self.budget = normalise_budget(self.budget)
        if isinstance(self.block_types, str):
            raise ValueError("block_types must be a list with one type name per block, not a single string")
        self.block_types = [str(t) for t in self.block_types]
        # the budget's own checks first: their messages name the budget (BlockRemovalProblem's would not)
        check_budget(self.block_types, self.budget, [int(b) for b in self.keep if isinstance(b, (int, np.integer))])
        self.base = BlockRemovalProblem(Q=self.Q, M=sum(self.budget.values()), const=self.const,
                                        keep=tuple(self.keep), block_types=self.block_types,
                                        only_types=tuple(self.budget), energy=str(self.energy).lower())
        self.Q, self.const, self.keep = self.base.Q, self.base.const, self.base.keep
        self.candidates = check_budget(self.block_types, self.budget, self.keep)

    @property
    def N(self) -> int:
        """Number of blocks."""
        return int(self.Q.shape[0])

    @property
    def M(self) -> int:
        """Total number of blocks removed (the sum of the budget)."""
        return int(sum(self.budget.values()))

    @property
    def label(self) -> str:
        """The budget's canonical label (:func:`budget_label`)."""
        return budget_label(self.budget)

    @property
    def per_type_states(self) -> dict[str, int]:
        """``{type: C(removable blocks of the type, count)}``."""
        return {t: math.comb(len(self.candidates[t]), c) for t, c in self.budget.items()}

    @property
    def n_states(self) -> int:
        """Number of feasible states: the product of :attr:`per_type_states`."""
        return math.prod(self.per_type_states.values())

    def energy_of(self, X):
        """``xᵀQx + const`` of full 0/1 states."""
        return self.base.energy_of(X)

    def feasible(self, X) -> np.ndarray:
        """Whether each full state removes exactly ``budget[t]`` blocks of each type ``t`` and nothing else
        (``keep`` respected)."""
        X = np.asarray(X)
        single = X.ndim == 1
        X2 = np.atleast_2d(X).astype(np.int64)
        ok = np.asarray(self.base.feasible(X2), dtype=bool).reshape(-1)
        types = np.asarray(self.block_types, dtype=object)
        for t, c in self.budget.items():
            ok &= X2[:, types == t].sum(axis=1) == c
        return bool(ok[0]) if single else ok


def type_budget_problem(Q_or_H, block_types: Sequence[str], budget: Mapping[str, int] | str, const: float = 0.0,
                        energy: str = "fisher", keep: Iterable[int] = ()) -> TypeBudgetProblem:
    """Build a :class:`TypeBudgetProblem`. ``Q_or_H`` is the symmetric matrix of ``xᵀQx`` — the Fisher ``H`` for
    the paper's energy; for the Taylor energy pass
    ``Q, const = cbo_utils.problem.ising.quadratic_form(H, g, "taylor")``. ``block_types`` are the names
    :func:`cbo_utils.model.blocks.block_types` returns; ``energy`` is a label."""
    return TypeBudgetProblem(Q=Q_or_H, block_types=list(block_types), budget=budget, const=const,
                             keep=tuple(keep), energy=energy)
