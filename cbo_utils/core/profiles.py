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
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ValueError(f"the profile {p} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"the profile {p} is not UTF-8 text (a binary file?)") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"the profile {p} must be a YAML mapping of settings (key: value lines), got "
                         f"{'an empty file' if cfg is None else 'a ' + type(cfg).__name__}")
    check_keys(f"profile ({p.name})", cfg, PROFILE_KEYS)
    check_types(f"profile ({p.name})", cfg, PROFILE_TYPES)
    base = cfg.pop("extends", None)
    if base is not None:
        if _depth >= 4:
            raise ValueError(f"the profile {p} extends profiles more than 4 deep (a cycle?); extend a packaged "
                             "profile that does not extend another")
        cfg = merge_settings(load_profile(str(base), _depth=_depth + 1), cfg)
    check_choices(f"profile ({p.name})", cfg)   # the merged settings: what the stages will read
    return cfg


#: the type of each top-level profile setting (see :func:`check_types`)
PROFILE_TYPES = {"profile": "str", "extends": "str", "models": "list[str]", "dtype": "str", "calibration": "str",
                 "samples": "posint", "max_tokens": "posint|none", "exact_hessian_samples": "nonnegint",
                 "M_values": "M", "k": "posint", "solver": "str", "bound": "bool", "energy": "str", "seed": "int",
                 "device_map": "str|none", "compare": "dict", "retrain": "dict", "hybrid": "dict"}


def _type_ok(v, spec: str) -> bool:
    if "|" in spec:
        return any(_type_ok(v, s) for s in spec.split("|"))
    is_int = isinstance(v, int) and not isinstance(v, bool)
    if spec == "none":
        return v is None
    if spec == "int":
        return is_int
    if spec == "posint":
        return is_int and v > 0
    if spec == "nonnegint":
        return is_int and v >= 0
    if spec == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
    if spec == "posnumber":
        return _type_ok(v, "number") and v > 0
    if spec == "str":
        return isinstance(v, str)
    if spec == "bool":
        return isinstance(v, bool)
    if spec == "dict":
        return isinstance(v, dict)
    if spec == "list":
        return isinstance(v, list)
    if spec.startswith("list[") and spec.endswith("]"):
        return isinstance(v, list) and all(_type_ok(x, spec[5:-1]) for x in v)
    if spec == "M":   # a non-empty list of positive ints, or a non-empty mapping model -> such a list
        def one(x):
            return _type_ok(x, "list[posint]") and len(x) > 0

        return one(v) or (isinstance(v, dict) and len(v) > 0 and all(one(x) for x in v.values()))
    raise AssertionError(f"unknown type spec {spec!r}")


_TYPE_WORDS = {"posint": "a whole number above 0", "nonnegint": "a whole number, 0 or more", "int": "a whole number",
               "number": "a finite number", "posnumber": "a finite number above 0", "str": "a string",
               "bool": "true or false", "dict": "a mapping (key: value lines)", "list": "a list",
               "none": "null",
               "M": "a non-empty list of block counts like [4, 8] (or a mapping model → such a list)"}


def _describe(spec: str) -> str:
    if "|" in spec:
        return " or ".join(_describe(s) for s in spec.split("|"))
    if spec.startswith("list["):
        return f"a list of {_describe(spec[5:-1]).removeprefix('a ')}s".replace("numbers above 0s", "numbers above 0")
    return _TYPE_WORDS.get(spec, spec)


def check_types(section: str, given: Mapping, types: Mapping[str, str]) -> None:
    """Refuse settings of the wrong type (``M_values: two``, ``samples: -3``, ``bound: maybe``), naming the key, the
    value and what it must be (one rule for every section)."""
    for k, spec in types.items():
        if k in given and not _type_ok(given[k], spec):
            raise ValueError(f"{section}: {k} = {given[k]!r} must be {_describe(spec)}")


def check_like(section: str, given: Mapping, defaults: Mapping) -> None:
    """Refuse settings whose type differs from their default's (an int where the default is an int, a number where it
    is a float, true/false, a string, a list, a mapping — checked inside nested mappings too) and negative or
    non-finite numbers (every numeric setting of these sections is a count, a rate or a size). Settings whose
    default is ``None`` are not typed."""
    kinds = ((bool, "bool"), (int, "int"), (float, "number"), (str, "str"), (list, "list"), (dict, "dict"))
    for k, v in given.items():
        d = defaults.get(k)
        if d is None or v is None and isinstance(d, (list, dict)):
            continue
        spec = next(name for t, name in kinds if isinstance(d, t))
        if spec == "int" and isinstance(v, float) and v.is_integer():
            v = int(v)
        if not _type_ok(v, spec) and not (spec == "number" and _type_ok(v, "int")):
            raise ValueError(f"{section}: {k} = {v!r} must be {_describe(spec)} (like its default, {d!r})")
        if spec in ("int", "number") and not (_type_ok(v, "number") and v >= 0):
            raise ValueError(f"{section}: {k} = {v!r} must be a finite number, 0 or more")
        if spec == "dict":
            check_like(f"{section}.{k}", v, d)


#: The allowed values of the enum-like profile settings, by dotted key (``section.key``; all of ``retrain.train`` and
#: ``retrain.per_model`` also go through :meth:`cbo_utils.prune.distill.DistillConfig.check`). Literal here, since core
#: imports no higher layer: each tuple is what the code reading the setting accepts — ``solver``:
#: :func:`cbo_utils.solvers.heuristics.solve`, ``energy``: the gradient energies of
#: :data:`cbo_utils.problem.energies.ENERGIES` (a package that registers another adds it here), ``dtype``:
#: :func:`cbo_utils.model.load.parse_dtype`, ``device_map``: accelerate's strategies and a device. Entries ending in
#: ``":"`` are prefixes (``text:PATH``), entries ``*.ext`` file names by their ending; a list-valued setting has
#: each element checked; ``None`` is always allowed where the setting may be null.
PROFILE_CHOICES: dict[str, tuple[str, ...]] = {
    "solver": ("exact", "sa", "tabu", "auto", "naive", "brute_force", "simulated_annealing", "neal", "enumeration",
               "bruteforce"),
    "energy": ("fisher", "taylor"),
    "dtype": ("float32", "bfloat16", "float16"),
    "device_map": ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "mps", "cuda", "cuda:"),
    "calibration": ("mix", "dev", "embedded", "openhermes", "text:", "jsonl:", "hf:", "*.txt", "*.jsonl", "*.json"),
    "compare.task_source": ("offline", "builtin"),
    "compare.ppl_texts": ("boolq", "lambada"),
    "compare.dev_source": ("mix", "sciq"),
    "compare.pair_table": ("screened", "full"),
    "retrain.data.source": ("embedded", "openhermes", "jsonl:"),
    "retrain.train.teacher_dtype": ("bfloat16", "float16", "float32", "nf4"),   # = DistillConfig.TEACHER_DTYPES
    "retrain.train.student_dtype": ("float32", "bfloat16", "float16"),          # = DistillConfig.STUDENT_DTYPES
    "hybrid.energy": ("fisher", "taylor"),
    "hybrid.calibration": ("mix", "embedded", "openhermes", "text:", "jsonl:", "hf:", "*.txt", "*.jsonl", "*.json"),
    "hybrid.eval_source": ("sciq", "boolq"),
    "hybrid.reasoning_source": ("builtin", "offline"),
    "hybrid.reasoning_dtype": ("float32", "bfloat16", "float16"),
    "hybrid.block_influence": ("one_shot", "iterative"),
}

#: list settings that must not be empty (an empty one runs nothing and reports files that were never written)
PROFILE_NONEMPTY = ("models", "compare.models", "compare.M_values", "retrain.models", "retrain.M_values",
                    "retrain.methods")


def _choice_ok(v, choices: tuple[str, ...]) -> bool:
    if not isinstance(v, str):
        return False
    for c in choices:
        if c.startswith("*.") and v.endswith(c[1:]) and len(v) > len(c) - 1:
            return True
        if c.endswith(":") and v.startswith(c) and (c != "cuda:" or v[len(c):].isdigit()) and len(v) > len(c):
            return True
        if v == c:
            return True
    return False


def _lookup(cfg: Mapping, dotted: str):
    """``(found, value)`` of a dotted key in nested mappings."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_choices(section: str, cfg: Mapping, choices: Mapping[str, tuple[str, ...]] | None = None,
                  nonempty: Iterable[str] | None = None) -> None:
    """Refuse an enum-like setting whose value is not one of its choices (``solver: quantum``), naming the key, the
    value and the choices, and an empty list where one is needed (:data:`PROFILE_CHOICES`,
    :data:`PROFILE_NONEMPTY`); ``retrain.train`` / ``retrain.per_model`` settings by
    :meth:`~cbo_utils.prune.distill.DistillConfig.check`."""
    for key, allowed in (PROFILE_CHOICES if choices is None else choices).items():
        found, v = _lookup(cfg, key)
        if not found or v is None:
            continue
        values = v if isinstance(v, list) else [v]
        bad = [x for x in values if not _choice_ok(x, allowed)]
        if bad:
            shown = ", ".join(c + ("PATH" if c in ("text:", "jsonl:") else "NAME" if c == "hf:" else "N")
                              if c.endswith(":") else "PATH" + c[1:] if c.startswith("*.") else c for c in allowed)
            raise ValueError(f"{section}: {key} = {bad[0]!r} is not one of the choices: {shown}")
    for key in PROFILE_NONEMPTY if nonempty is None else nonempty:
        found, v = _lookup(cfg, key)
        if found and isinstance(v, (list, dict)) and not v:
            raise ValueError(f"{section}: {key} is empty; give at least one value (or leave the key out for the "
                             "default)")


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


def results_dir(cfg: Mapping, results=None, create: bool = True) -> Path:
    """Where a stage writes: ``results`` when given, else ``./results/<profile>`` under the current directory —
    claimed as a results folder cbo owns before anything is written (:func:`cbo_utils.core.artifacts.claim_folder`:
    a folder of the user's is refused; a results folder of an earlier run is resumed). ``create=False``: only the
    check (nothing is created yet)."""
    from cbo_utils.core.artifacts import claim_folder

    path = Path(results) if results else Path.cwd() / "results" / str(cfg.get("profile", "custom"))
    return claim_folder(path, "results", create=create)


def check_keys(section: str, given: Mapping, allowed: Iterable[str]) -> None:
    """Refuse unknown keys of a settings section, naming the allowed ones (one rule for every section)."""
    allowed = list(allowed)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {section} setting(s) {unknown}; allowed: {sorted(allowed)}")

