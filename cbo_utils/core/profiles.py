"""Profiles (``tiny``, ``mini``, ``paper``: YAML files shipped inside the package, ``cbo_utils/configs/``), the
overrides the notebooks pass, the per-model M values, file-name slugs, settings validation, and where results go.

A profile is named (one of :func:`profile_names`) or given as a path to a YAML file of the same shape.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

CONFIGS = importlib.resources.files("cbo_utils") / "configs"


def profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in CONFIGS.iterdir() if p.name.endswith(".yaml"))


def profile_path(name_or_path: str) -> Path:
    """The YAML file of a profile: a path as given, or the packaged ``configs/<name>.yaml``."""
    p = Path(name_or_path)
    if p.suffix:
        return p
    return Path(str(CONFIGS / f"{name_or_path}.yaml"))


#: the top-level keys of a profile (the sections ``compare``, ``retrain``, ``hybrid`` check their own keys)
PROFILE_KEYS = ("profile", "extends", "models", "dtype", "calibration", "samples", "max_tokens",
                "exact_hessian_samples", "M_values", "k", "solver", "bound", "energy", "seed", "device_map", "compare",
                "retrain", "hybrid")


def load_profile(name_or_path: str, _depth: int = 0) -> dict:
    """A profile (packaged name or YAML path) as a dict; unknown top-level keys are errors. ``extends: <profile>``
    takes that profile's settings and changes only those given (:func:`merge_settings`)."""
    p = profile_path(name_or_path)
    if not p.is_file():
        raise FileNotFoundError(f"no profile {name_or_path!r} ({p}); choose one of {', '.join(profile_names())} "
                                "or give the path of a YAML file")
    cfg = yaml.safe_load(p.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"the profile {p} must be a YAML mapping of settings, got {type(cfg).__name__}")
    check_keys(f"profile ({p.name})", cfg, PROFILE_KEYS)
    base = cfg.pop("extends", None)
    if base is not None:
        if _depth >= 4:
            raise ValueError(f"the profile {p} extends profiles more than 4 deep (a cycle?); extend a packaged "
                             "profile that does not extend another")
        cfg = merge_settings(load_profile(str(base), _depth=_depth + 1), cfg)
    return cfg


def merge_settings(base: Mapping, over: Mapping) -> dict:
    """``base`` with ``over``'s values: mappings are merged key by key (a profile that ``extends`` another names
    only what it changes), every other value replaces the base's."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_settings(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def profile_with(profile: str, section: str, override=None) -> dict:
    """The profile, with its ``section`` (``compare``, ``retrain``, ``hybrid``) replaced by ``override`` when given
    (how the notebooks pass their parameter to a stage)."""
    cfg = load_profile(profile)
    return cfg if override is None else {**cfg, section: dict(override)}


def slug(model: str) -> str:
    """A model name as one path component (``org/name`` → ``org__name``)."""
    return model.replace("/", "__")


def m_values(cfg: dict, model: str) -> list[int]:
    """The profile's M values for ``model`` (``M_values`` is a list, or a mapping model → list)."""
    mv = cfg["M_values"]
    return list(mv[model] if isinstance(mv, dict) else mv)


def results_dir(cfg: Mapping, results=None) -> Path:
    """Where a stage writes: ``results`` when given, else ``./results/<profile>`` under the current directory."""
    return Path(results) if results else Path.cwd() / "results" / str(cfg.get("profile", "custom"))


def check_keys(section: str, given: Mapping, allowed: Iterable[str]) -> None:
    """Refuse unknown keys of a settings section, naming the allowed ones (one rule for every section)."""
    allowed = list(allowed)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {section} setting(s) {unknown}; allowed: {sorted(allowed)}")

