"""The method registry: every selection method by name — the baselines, SWM, random and every CBO variant — each
``f(model, calibration, M, **kw) -> Selection``. :func:`run_method` runs any of them; :func:`register_method` adds
one (a new method is one function plus one call).
"""

from __future__ import annotations

from collections.abc import Callable

from cbo_utils.select.baselines import (
    angular_distance,
    block_influence,
    norm_ratio,
    one_shot_perplexity,
    random_selection,
    sleb,
    tail,
    taylor_plus,
)
from cbo_utils.select.cbo import CBO_VARIANTS, DEFAULT_VARIANT, select_cbo
from cbo_utils.select.selection import Selection
from cbo_utils.select.swm import sliding_window_merging


# ------------------------------------------------------------------------------------------------- registry
def _bi_iterative(model, calibration, M, **kw):
    return block_influence(model, calibration, M, iterative=True, **kw)


def _random(model, calibration, M, seed: int = 0):
    return random_selection(model, M, seed)


BASELINES: dict[str, Callable[..., Selection]] = {
    "block_influence": block_influence,
    "block_influence_iterative": _bi_iterative,
    "norm_ratio": norm_ratio,
    "angular_distance": angular_distance,
    "tail": tail,
    "one_shot_perplexity": one_shot_perplexity,
    "taylor_plus": taylor_plus,
    "sleb": sleb,
    "sliding_window_merging": sliding_window_merging,
    "random": _random,
}


ALIASES = {"bi": "block_influence", "bi_iterative": "block_influence_iterative", "norm": "norm_ratio",
           "angular": "angular_distance", "ppl": "one_shot_perplexity", "taylor+": "taylor_plus",
           "taylor": "taylor_plus", "swm": "sliding_window_merging"}


#: every method by name: the baselines, then the CBO variants (``cbo`` = the default variant)
METHODS: dict[str, Callable[..., Selection]] = dict(BASELINES)


def register_method(name: str, fn: Callable[..., Selection] | None = None, aliases: tuple[str, ...] = ()):
    """Register ``fn(model, calibration, M, **kw) -> Selection`` under ``name`` (usable as a decorator)."""
    def add(f):
        if name in METHODS:
            raise ValueError(f"a method named {name!r} is already registered")
        METHODS[name] = f
        for a in aliases:
            ALIASES[a] = name
        return f

    return add(fn) if fn is not None else add


def _cbo_variant(variant: str) -> Callable[..., Selection]:
    def run(model, calibration, M, **kw):
        return select_cbo(model, calibration, M, variant=variant, **kw)

    run.__doc__ = f"CBO variant {variant}: {CBO_VARIANTS[variant].description}"
    return run


for _name in CBO_VARIANTS:
    register_method(_name, _cbo_variant(_name))
ALIASES["cbo"] = DEFAULT_VARIANT


def method_name(name: str) -> str:
    """The registered name of ``name`` (case, ``-``/``_`` and aliases resolved), or a ValueError naming the choices."""
    raw = str(name).strip().lower()
    for key in (raw, raw.replace("-", "_")):
        key = ALIASES.get(key, key)
        if key in METHODS:
            return key
    raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)} or an alias "
                     f"({', '.join(f'{a} → {b}' for a, b in sorted(ALIASES.items()))})")


def run_method(name: str, model, calibration, M: int, **kw) -> Selection:
    """Run the method ``name`` (a key of :data:`METHODS` or an alias: cbo, bi, bi-iterative, norm, angular, ppl,
    taylor+, swm); ``kw`` go to the method (``random`` takes ``seed``, CBO variants ``cache_dir``/``seed``)."""
    return METHODS[method_name(name)](model, calibration, M, **kw)
