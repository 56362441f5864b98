"""Knowledge distillation: the loss against a hand computation, the schedule against transformers, two processes
against one, resuming against an uninterrupted run, the loss going down, and the saved model reloading."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cbo_utils.core.artifacts import atomic_write_text, claim_folder
from cbo_utils.model.blocks import remove_blocks
from cbo_utils.model.tiny import build_tiny
from cbo_utils.prune.distill import DistillConfig, KDData, batch_plan, cosine_lr, distill, heldout_kl, kd_data, kd_loss

HERE = Path(__file__).resolve().parent


def teacher_student(remove=(1, 4)):
    teacher, tok = build_tiny("tiny-llama")
    student = copy.deepcopy(teacher)
    remove_blocks(student, list(remove))
    return teacher, student, tok


def random_data(tok, n_train=16, n_held=4, seed=0) -> KDData:
    g = torch.Generator().manual_seed(seed)

    def seqs(n):
        return [torch.randint(3, len(tok), (10 + (7 * i) % 13,), generator=g) for i in range(n)]

    return KDData(seqs(n_train), seqs(n_held), {"source": "random-test"})


def test_kd_loss_equals_hand_computed_kl():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[2.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
    t = torch.tensor([[[0.0, 1.0, 0.0], [1.0, -1.0, 0.0]], [[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])   # the last position is padding

    def kl(tl, sl):
        pt = [math.exp(x) / sum(math.exp(y) for y in tl) for x in tl]
        ps = [math.exp(x) / sum(math.exp(y) for y in sl) for x in sl]
        return sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))

    want = [kl(t[0, 0].tolist(), s[0, 0].tolist()), kl(t[0, 1].tolist(), s[0, 1].tolist()),
            kl(t[1, 0].tolist(), s[1, 0].tolist())]
    assert kd_loss(s, t, mask).item() == pytest.approx(sum(want) / 3, rel=1e-6)
    assert kd_loss(s, t, mask, reduction="sum").item() == pytest.approx(sum(want), rel=1e-6)
    assert kd_loss(t, t, mask).item() == pytest.approx(0.0, abs=1e-7)
    # temperature 2: KL of the softened distributions, times T²
    want2 = kl((t[0, 0] / 2).tolist(), (s[0, 0] / 2).tolist()) * 4
    assert kd_loss(s[:1, :1], t[:1, :1], temperature=2.0).item() == pytest.approx(want2, rel=1e-6)
    with pytest.raises(ValueError, match="vocabulary"):
        kd_loss(s[..., :2], t)


def test_cosine_lr_matches_transformers_schedule():
    from transformers import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=3e-4)
    sch = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=40)
    for step in range(40):
        assert cosine_lr(step, 3e-4, 5, 40) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sch.step()


def test_batch_plan_is_deterministic_and_covers_epochs():
    cfg = DistillConfig(batch_size=4, epochs=2.0, seed=3)
    plan = batch_plan(10, cfg)
    assert len(plan) == 4 and all(len(b) == 4 for b in plan)      # 2 full batches per epoch
    assert plan == batch_plan(10, cfg)
    assert len(set(plan[0] + plan[1])) == 8                         # no repeats within an epoch
    assert len(batch_plan(10, DistillConfig(batch_size=4, epochs=2.0, max_steps=3))) == 3
    with pytest.raises(ValueError, match="batch_size"):
        batch_plan(3, cfg)
    with pytest.raises(ValueError, match=r"unknown retrain.train setting"):
        DistillConfig.from_dict({"learning_rate": 1})


def test_one_step_equals_plain_gradient_step_on_the_global_token_mean():
    """An independent computation: one AdamW step from the mean KL over all non-pad tokens of the batch."""
    teacher, student, tok = teacher_student()
    ref = copy.deepcopy(student)
    data = random_data(tok)
    cfg = DistillConfig(lr=1e-2, batch_size=4, micro_batch_size=2, max_steps=1, warmup_steps=0, save_every=0,
                        weight_decay=0.0, grad_clip=1e9)

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        distill(student, teacher, tok, data, cfg, d, progress=False, evaluate_heldout=False, save_model=False)
    batch = [data.train[i] for i in batch_plan(len(data.train), cfg)[0]]
    L = max(len(x) for x in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    att = torch.zeros(len(batch), L, dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, :len(x)], att[i, :len(x)] = x, 1
    ref.train()
    with torch.no_grad():
        tl = teacher(input_ids=ids, attention_mask=att).logits
    loss = kd_loss(ref(input_ids=ids, attention_mask=att).logits, tl, att)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    loss.backward()
    opt.step()
    for (n, a), (_, b) in zip(student.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)  # first Adam step ≈ ±lr: roundoff where g ≈ 0


@pytest.mark.slow
def test_two_processes_take_the_same_step_as_one(tmp_path):
    out = tmp_path / "two.safetensors"
    env = {**os.environ, "PYTHONPATH": f"{HERE}:{HERE.parent}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           str(HERE / "distill_accelerate_script.py"), str(out), str(tmp_path / "run2")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_model

    teacher, student, tok = teacher_student()
    cfg = DistillConfig(lr=1e-2, batch_size=4, micro_batch_size=1, max_steps=1, warmup_steps=0, save_every=0)
    distill(student, teacher, tok, random_data(tok), cfg, tmp_path / "run1", progress=False,
            evaluate_heldout=False, save_model=False)
    _, two, _ = teacher_student()
    load_model(two, str(out))
    before = teacher_student()[1]
    moved = 0.0
    for (n, a), (_, b), (_, c) in zip(student.named_parameters(), two.named_parameters(), before.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=n)  # 0.1 % of one Adam step (lr 1e-2)
        moved = max(moved, float((a - c).detach().abs().max()))
    assert moved > 1e-3   # the step did change the parameters


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path):
    teacher, s1, tok = teacher_student()
    data = random_data(tok)
    cfg = DistillConfig(lr=5e-3, batch_size=4, micro_batch_size=2, epochs=2.0, max_steps=6, warmup_steps=2,
                        save_every=2)
    full = distill(s1, teacher, tok, data, cfg, tmp_path / "full", progress=False)
    _, s2, _ = teacher_student()
    part = distill(s2, teacher, tok, data, cfg, tmp_path / "cut", progress=False, stop_after=3)
    assert part.steps == 3 and part.out_dir is None and (tmp_path / "cut" / "checkpoint" / "state.json").exists()
    _, s3, _ = teacher_student()   # a fresh process would start from the pruned (untrained) model
    rest = distill(s3, teacher, tok, data, cfg, tmp_path / "cut", progress=False)
    assert rest.resumed_from == 3 and rest.steps == 6
    assert rest.losses == pytest.approx(full.losses, rel=1e-5)
    for (n, a), (_, b) in zip(s1.named_parameters(), s3.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=n)
    assert not (tmp_path / "cut" / "checkpoint").exists()
    # a finished run is not repeated: the record is read back and the weights loaded
    _, s4, _ = teacher_student()
    again = distill(s4, teacher, tok, data, cfg, tmp_path / "full", progress=False)
    assert again.losses == full.losses
    for (n, a), (_, b) in zip(s1.named_parameters(), s4.named_parameters()):
        torch.testing.assert_close(b, a, msg=n)


def test_loss_decreases_and_saved_model_reloads_on_embedded_chat_data(tmp_path):
    teacher, student, tok = teacher_student()
    data = kd_data(tok, "embedded", max_length=64, packing=True, heldout_fraction=0.01, heldout_max=24,
                   max_train=64, samples=1200)
    assert data.meta["packing"] and all(len(x) == 64 for x in data.train)
    cfg = DistillConfig(lr=1e-3, batch_size=8, micro_batch_size=4, epochs=2.0, max_steps=16, warmup_steps=2,
                        save_every=0)
    res = distill(student, teacher, tok, data, cfg, tmp_path / "kd", progress=False)
    assert res.heldout_kl_after < 0.7 * res.heldout_kl_before
    assert sum(res.losses[-4:]) < sum(res.losses[:4])
    assert res.tokens == 16 * 8 * 64
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "kd").eval()
    assert back.config.num_hidden_layers == 4
    ids = data.heldout[0][None]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, student.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert heldout_kl(back, teacher, data.heldout, tok.pad_token_id) == pytest.approx(res.heldout_kl_after,
                                                                                      rel=1e-4)
    assert (tmp_path / "kd" / "train_log.csv").is_file() and (tmp_path / "kd" / "retraining.json").is_file()


@pytest.mark.slow
def test_retrain_runner_writes_before_and_after_rows_and_resumes(tmp_path):
    import pandas as pd

    from cbo_utils.experiments.retrain import run_retrain

    claim_folder(tmp_path, "results")   # the selections of an earlier run of cbo, written into its results folder
    atomic_write_text(tmp_path / "selections.csv",
        "model,method,M,removed_blocks,energy,selection_seconds,calibration_tokens,seed\n"
        "tiny-llama,block_influence,2,1 4,,0.1,512,\n")
    report = run_retrain("tiny", tmp_path, M_values=[2], methods=["block_influence", "sleb"], progress=False)
    ev = pd.read_csv(tmp_path / "evaluations.csv")
    ppl = ev[ev["task"] == "heldout_ppl"].set_index("retrained")["value"]
    assert set(ppl.index) == {False, True} and ppl[True] != ppl[False]
    assert {"arc_easy", "piqa"} <= set(ev[ev["retrained"]]["task"])
    rt = pd.read_csv(tmp_path / "retraining.csv")
    assert len(rt) == 1 and rt["heldout_kl_after"].iloc[0] < rt["heldout_kl_before"].iloc[0]
    assert rt["tokens"].iloc[0] == 4 * 8 * 64   # the tiny profile: 4 steps × 8 windows × 64 tokens
    assert "| block_influence | 1 4 |" in report.read_text()
    folder = tmp_path / "tiny-llama" / "retrain" / "block_influence_M2"
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 4
    stamp = (tmp_path / "evaluations.csv").stat().st_mtime_ns
    run_retrain("tiny", tmp_path, M_values=[2], methods=["block_influence"], progress=False)   # nothing left to do
    assert (tmp_path / "evaluations.csv").stat().st_mtime_ns == stamp


def test_the_retraining_report_pairs_retrained_models_on_the_same_windows(tmp_path):
    """After retraining, each method's perplexity ratio to the best *retrained* baseline, recomputed here from the
    per-window NLLs of the retrained models (not of the models before retraining)."""
    import pandas as pd

    from cbo_utils.core.profiles import load_profile
    from cbo_utils.evaluate.statistics import paired_log_ratio
    from cbo_utils.experiments.retrain import run_retrain

    claim_folder(tmp_path, "results")   # the selections of an earlier run of cbo, written into its results folder
    atomic_write_text(tmp_path / "selections.csv",
        "model,method,M,removed_blocks,energy,selection_seconds,calibration_tokens,seed\n"
        "tiny-llama,block_influence,2,1 4,,0.1,512,\n"
        "tiny-llama,cbo-pairs-rerank,2,2 3,,0.1,512,\n")
    section = {**load_profile("tiny")["retrain"], "evaluate_zero_shot": False}
    report = run_retrain("tiny", tmp_path, M_values=[2], methods=["block_influence", "cbo-pairs-rerank"],
                         progress=False, retrain=section)
    w = pd.read_csv(tmp_path / "window_nll.csv")
    w = w[(w["retrained"].astype(str).str.lower() == "true") & (w["task"] == "heldout_ppl")]
    bi = w[w["method"] == "block_influence"].sort_values("window")
    cbo = w[w["method"] == "cbo-pairs-rerank"].sort_values("window")
    want = paired_log_ratio(cbo["nll"].to_numpy(), bi["nll"].to_numpy(), cbo["tokens"].to_numpy())
    text = report.read_text()
    assert "## Paired comparison after retraining" in text
    part = text[text.index("### tiny-llama, heldout_ppl, M = 2"):]
    assert "best retrained baseline: `block_influence`" in part.splitlines()[0]
    row = next(ln for ln in part.splitlines() if ln.startswith("| cbo-pairs-rerank |"))
    assert float(row.split("|")[3]) == pytest.approx(want["ratio"], rel=1e-3)
    assert f"{want['ratio_lo']:.3f}–{want['ratio_hi']:.3f}" in row
