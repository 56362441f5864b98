"""Calibration loaders on local data (the Hub code path runs on a local fixture in the same format)."""

import json

import pytest
import torch

from cbo_utils.calibration import (
    embedded,
    from_hf_dataset,
    from_jsonl,
    from_text_file,
    heldout_text,
    load_calibration,
    render_chat,
    sciq_conversations,
)


def test_embedded_windows_are_exact_deterministic_and_chat_formatted(tokenizer):
    a = embedded(tokenizer, samples=6, max_tokens=200)
    b = embedded(tokenizer, samples=6, max_tokens=200)
    assert len(a) == 6 and all(s["input_ids"].numel() == 200 for s in a)
    assert a.sha256 == b.sha256 and a.tokens == 6 * 200
    text = tokenizer.decode(torch.cat([s["input_ids"] for s in a]))
    assert "<|im_start|>user" in text and "<|im_start|>assistant" in text and "Answer:" in text
    d = a.describe()
    assert 0 < d["response_tokens"] < d["tokens"]


def test_embedded_calibration_is_disjoint_from_heldout_and_evaluation_text():
    cal = sciq_conversations("calibration")
    held = sciq_conversations("heldout")
    qs_cal = {c[0]["content"] for c in cal}
    assert qs_cal.isdisjoint({c[0]["content"] for c in held})
    boolq = set(heldout_text())
    supports = {c[1]["content"].split("\n\nAnswer:")[0] for c in cal}
    assert supports.isdisjoint(boolq) and len(boolq) > 1000


def test_response_mask_marks_exactly_the_assistant_turn(tokenizer):
    msgs = [{"role": "user", "content": "What boils at one hundred degrees?"},
            {"role": "assistant", "content": "Water boils at one hundred degrees."}]
    ids, mask = render_chat(tokenizer, msgs)
    resp = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert resp.startswith("Water boils at one hundred degrees.")
    assert "What boils" not in resp


def test_text_file_windows_with_bos(tokenizer, tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("The heart pumps blood through the arteries. " * 200)
    c = from_text_file(p, tokenizer, samples=4, max_tokens=32)
    assert all(s["input_ids"][0] == tokenizer.bos_token_id and s["input_ids"].numel() == 32 for s in c)
    with pytest.raises(ValueError, match="only"):
        from_text_file(p, tokenizer, samples=10_000, max_tokens=32)


def _write_sharegpt(path, n=12):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Question {i}?"},
                               {"from": "gpt", "value": f"Answer number {i}."}]} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return rows


def test_jsonl_formats(tokenizer, tmp_path):
    p = tmp_path / "c.jsonl"
    _write_sharegpt(p, 3)
    with open(p, "a") as fh:
        fh.write("\n" + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}))
        fh.write("\n" + json.dumps({"text": "plain text row"}))
    c = from_jsonl(p, tokenizer, samples=5)
    assert len(c) == 5
    assert "<|im_start|>system\nBe brief." in tokenizer.decode(c[0]["input_ids"])
    assert c[4]["loss_mask"].all()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(ValueError, match="messages"):
        from_jsonl(bad, tokenizer, samples=1)


def test_paper_recipe_on_a_local_fixture(tokenizer, tmp_path):
    """OpenHermes-style rows: human→user, gpt→assistant, shuffled with seed 42, first n, no truncation."""
    import datasets

    p = tmp_path / "hermes.json"
    rows = _write_sharegpt(p, 12)
    c = from_hf_dataset(tokenizer, data_files=str(p), samples=5, seed=42)
    order = datasets.load_dataset("json", data_files=str(p), split="train").shuffle(seed=42)
    expect = [rows[[r["conversations"][1]["value"] for r in rows].index(o["conversations"][1]["value"])]
              for o in order.select(range(5))]
    for s, row in zip(c, expect):
        text = tokenizer.decode(s["input_ids"])
        assert row["conversations"][1]["value"] in text and "<|im_start|>user" in text
        assert "<|im_start|>assistant\n" + row["conversations"][2]["value"] in text
    assert c.recipe["seed"] == 42 and c.recipe["max_tokens"] is None
    short = from_hf_dataset(tokenizer, data_files=str(p), samples=3, max_length=10 ** 6)
    assert len(short) == 3
    with pytest.raises(ValueError, match="only"):
        from_hf_dataset(tokenizer, data_files=str(p), samples=3, max_length=5)


def test_spec_parsing(tokenizer, tmp_path):
    assert load_calibration("embedded", tokenizer, samples=2, max_tokens=32).recipe["source"] == "embedded:sciq"
    p = tmp_path / "x.txt"
    p.write_text("word " * 400)
    assert len(load_calibration(f"text:{p}", tokenizer, samples=2, max_tokens=16)) == 2
    with pytest.raises(ValueError, match="cannot read calibration spec"):
        load_calibration("nonsense", tokenizer)


# ------------------------------------------------------------------------------------ the mixtures (issue 24)
def _part_texts(name: str) -> list[str]:
    from cbo_utils.calibration import MIX_PARTS, mixture_documents

    kind = MIX_PARTS[name][0]
    return ["\n".join(t["content"] for t in d) if kind == "chat" else d for d in mixture_documents(name)]


def _grams(text: str, n: int = 13) -> set[str]:   # independent of calibration.shingles
    words, cur = [], ""
    for ch in text.lower() + " ":
        if ch.isalnum() or ch == "_":
            cur += ch
        elif cur:
            words.append(cur)
            cur = ""
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_mixture_parts_share_no_13_gram_with_the_test_texts_or_each_other():
    """Calibration (mix), development (dev) and test (BoolQ, LAMBADA passages) are different sources: no document of
    a mixture part shares a 13-word sequence with a test passage, and no calibration document with a development
    one (an independent check by word shingles, not by the datasets' names)."""
    from cbo_utils.calibration import CALIBRATION_MIX, DEVELOPMENT_MIX, lambada_text

    test = set().union(*(_grams(t) for t in heldout_text() + lambada_text()))
    grams = {}
    for part in CALIBRATION_MIX + DEVELOPMENT_MIX:
        docs = _part_texts(part)
        assert len(docs) >= 100, part
        grams[part] = set().union(*(_grams(d) for d in docs))
        assert not grams[part] & test, part
    cal = set().union(*(grams[p] for p in CALIBRATION_MIX))
    dev = set().union(*(grams[p] for p in DEVELOPMENT_MIX))
    assert not cal & dev


def test_mixture_windows_are_exact_interleaved_and_deterministic(tokenizer):
    from cbo_utils.calibration import CALIBRATION_MIX, mixture, mixture_windows

    a = mixture(tokenizer, "mix", samples=12, max_tokens=96)
    assert len(a) == 12 and all(s["input_ids"].numel() == 96 for s in a)
    assert a.sha256 == mixture(tokenizer, "mix", samples=12, max_tokens=96).sha256
    assert a.recipe["windows_per_part"] == {"sciq": 3, "squad": 3, "coqa-mctest": 2, "mbpp": 2, "gsm8k": 2}
    # window k comes from part k mod 5: each window's first tokens are found in that part's packed stream only
    for k, part in enumerate(CALIBRATION_MIX):
        one = mixture(tokenizer, "mix", samples=5, max_tokens=96)[k]["input_ids"]
        assert torch.equal(one, a[k]["input_ids"]), part
    text = [tokenizer.decode(s["input_ids"]) for s in a]
    assert "<|im_start|>assistant" in text[0] and "<|im_start|>" not in text[1]   # SciQ chat, SQuAD prose
    assert "def " in text[3] or "return" in text[3]                               # MBPP code
    assert load_calibration("mix", tokenizer, samples=12, max_tokens=96).sha256 == a.sha256
    w = mixture_windows(tokenizer, "dev", 8, 64)
    assert w.shape == (8, 64) and w.dtype == torch.long
    with pytest.raises(ValueError, match="unknown mixture"):
        mixture(tokenizer, "nope")
    with pytest.raises(ValueError, match="samples"):
        mixture(tokenizer, "dev", samples=4000, max_tokens=256)
