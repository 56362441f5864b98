"""`cbo prune-files` reads only the model's own storage and only files that are what their format declares.

Hostile inputs — symlinks out of the checkpoint, link chains and loops, FIFOs, truncated or foreign shards, an index
that does not match its shards, a block that lacks tensors, GGUF files whose header and tensors disagree — are run
through ``cbo_utils.cli.main`` in-process in a temporary folder (table CASES). Each must end with its exit code and
a one-line message naming the input, no traceback, every file present before (the sources, the fake private key in
the fake home) byte-identical afterwards, and no file created but the expected outputs. The Hugging Face cache
layout (snapshot files that are relative links into the repository's blobs) must keep working: it is pruned like
the plain folder, byte for byte, and the pruned model equals the source model with α = 0 on the removed blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cbo_utils.cli import main
from cbo_utils.model.blocks import Gates
from cbo_utils.model.tiny import tiny_llama
from cbo_utils.prune.files import prune_checkpoint_files, storage_root

gguf = pytest.importorskip("gguf")

KEY = (b"-----BEGIN OPENSSH PRIVATE KEY-----\ncbo-canary-7f3a91c2e5 (a fake key for the containment tests)\n"
       b"-----END OPENSSH PRIVATE KEY-----\n")
CANARY = b"cbo-canary-7f3a91c2e5"
REV = "0123456789abcdef0123456789abcdef01234567"
P = ["prune-files", "src", "--remove", "1", "--out", "out"]


# ------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama (4 blocks) saved as one file and as 5 shards, and the model itself."""
    root = tmp_path_factory.mktemp("base")
    model, tok = tiny_llama(num_layers=4, hidden=32)
    for name, shard in (("single", None), ("sharded", "40KB")):
        model.save_pretrained(root / name, **({"max_shard_size": shard} if shard else {}))
        tok.save_pretrained(root / name)
    return {"single": root / "single", "sharded": root / "sharded", "model": model}


def hf_cache(folder: Path, cache: Path, repo: str = "models--cbo-test--tiny-llama", rev: str = REV) -> Path:
    """``folder`` laid out as huggingface_hub lays out its cache: the bytes in ``<repo>/blobs/<hash>``, the files as
    relative links ``snapshots/<rev>/<path> → ../../blobs/<hash>``, ``refs/main`` naming the revision. Returns the
    snapshot folder."""
    root = cache / repo
    snap = root / "snapshots" / rev
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    return snap


def tiny_gguf(path: Path, blocks: int = 4, block_count: int | None = None) -> Path:
    """A small llama GGUF written with gguf.GGUFWriter: ``blk.<i>.*`` tensors for ``blocks`` blocks, the field
    ``llama.block_count`` = ``block_count`` (default: ``blocks``), a per-layer array, distinct data per tensor."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(blocks if block_count is None else block_count)
    w.add_context_length(64)
    w.add_array("llama.attention.head_count_kv", [i + 1 for i in range(blocks if block_count is None
                                                                         else block_count)])
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(8, 4))
    for i in range(blocks):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.full((4, 4), i, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_down.weight", np.full((4, 8), 10 + i, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def link(t: Path, name: str, target) -> None:
    (t / name).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(str(target), t / name)


def snapshot(t: Path) -> dict[str, tuple]:
    """Every entry under ``t`` without following links: files by SHA-256, links by their target text."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(t, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(t).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
    return out


def rewrite_single(t: Path, drop) -> None:
    """Rewrite ``src/model.safetensors`` without the tensors for which ``drop(name)`` is true."""
    path = t / "src" / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if not drop(k)}
    path.unlink()
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_index(t: Path, folder: str, fn) -> None:
    path = t / folder / "model.safetensors.index.json"
    idx = json.loads(path.read_text())
    fn(idx["weight_map"])
    path.write_text(json.dumps(idx))


# ------------------------------------------------------------------------------------------------- setups
def s_none(t, b):
    pass


def s_sharded(t, b):
    shutil.copytree(b["sharded"], t / "sharded")


def s_big_dir_link(t, b):
    big = t / "big"
    big.mkdir()
    (big / "data.bin.txt").write_bytes(os.urandom(4096))
    (big / "id_rsa").write_bytes(KEY)
    link(t, "src/extra", "../big")


def s_move_out_and_link(name):
    def setup(t, b):
        os.replace(t / "src" / name, t / "home" / name)
        link(t, f"src/{name}", f"../home/{name}")
    return setup


def s_chain_outside(t, b):
    link(t, "src/a.json", "b.json")
    link(t, "src/b.json", "../home/.ssh/id_rsa")


def s_chain_out_and_back(t, b):
    (t / "elsewhere").mkdir()
    link(t, "elsewhere/hop", "../src/tokenizer.json")
    link(t, "src/tok.json", "../elsewhere/hop")


def s_fifo(t, b):
    os.mkfifo(t / "src" / "pipe")


def s_hf_other_repo(t, b):
    snap = hf_cache(b["single"], t / "cache")
    other = t / "cache" / "models--someone--else" / "blobs"
    other.mkdir(parents=True)
    (other / "deadbeef").write_bytes(KEY)
    link(t, f"cache/models--cbo-test--tiny-llama/snapshots/{REV}/extra.txt",
         "../../../models--someone--else/blobs/deadbeef")
    assert snap.is_dir()


def s_hf_ok(t, b):
    hf_cache(b["single"], t / "cache")


def s_truncate(t, b):
    p = t / "src" / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def s_garbage(t, b):
    (t / "src" / "model.safetensors").write_bytes(os.urandom(5000))


def s_index_missing_shard(t, b):
    s_sharded(t, b)
    (t / "sharded" / "model-00003-of-00005.safetensors").unlink()


def s_index_moved_tensor(t, b):
    s_sharded(t, b)

    def move(wm):
        name = next(k for k, v in sorted(wm.items()) if v == "model-00002-of-00005.safetensors")
        wm[name] = "model-00004-of-00005.safetensors"
    edit_index(t, "sharded", move)


def s_index_outside(t, b):
    s_sharded(t, b)
    shutil.copy(t / "sharded" / "model-00002-of-00005.safetensors", t / "home" / "x.safetensors")

    def out(wm):
        for k, v in wm.items():
            if v == "model-00002-of-00005.safetensors":
                wm[k] = "../home/x.safetensors"
    edit_index(t, "sharded", out)


def s_out_contains_src(t, b):
    prune_checkpoint_files(b["single"], [0], t / "work")   # a folder cbo wrote, which --overwrite may replace
    os.replace(t / "src", t / "work" / "src")


def s_link_inside(t, b):
    link(t, "src/tokenizer_alias.json", "tokenizer.json")
    (t / "src" / "extra").mkdir()
    (t / "src" / "extra" / "notes.txt").write_text("notes that travel with the checkpoint\n")
    link(t, "src/extra_alias", "extra")
    link(t, "src/extra/config_alias.json", "../config.json")


def c_link_inside(t):
    src, out = t / "src", t / "out"
    assert (out / "tokenizer_alias.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (out / "extra_alias" / "notes.txt").read_bytes() == (src / "extra" / "notes.txt").read_bytes()
    assert (out / "extra" / "config_alias.json").read_bytes() == (src / "config.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


def c_hf_ok(t):
    out = t / "out"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    snap = t / "cache" / "models--cbo-test--tiny-llama" / "snapshots" / REV
    assert (out / "tokenizer.json").read_bytes() == (snap / "tokenizer.json").read_bytes()


def s_gguf(**kw):
    def setup(t, b):
        tiny_gguf(t / "m.gguf", **kw)
    return setup


def s_gguf_cut(frac=None, keep=None):
    def setup(t, b):
        data = tiny_gguf(t / "full.gguf").read_bytes()
        (t / "full.gguf").unlink()
        (t / "m.gguf").write_bytes(data[: keep if keep is not None else int(len(data) * frac)])
    return setup


def s_gguf_offset_beyond(t, b):
    tiny_gguf(t / "m.gguf")
    r = gguf.GGUFReader(str(t / "m.gguf"), "r+")
    r.tensors[-1].field.parts[5][0] = 1 << 20   # the last tensor's data offset, far past the end of the file
    r.data.flush()
    del r


def c_gguf_ok(t):
    a, b = gguf.GGUFReader(str(t / "m.gguf")), gguf.GGUFReader(str(t / "out.gguf"))
    assert b.fields["llama.block_count"].contents() == 3
    assert b.fields["llama.attention.head_count_kv"].contents() == [1, 3, 4]
    src = {t_.name: bytes(t_.data) for t_ in a.tensors}
    kept = [0, 2, 3]
    for t_ in b.tensors:
        name = t_.name
        if name.startswith("blk."):
            i, rest = name.split(".", 2)[1:]
            name = f"blk.{kept[int(i)]}.{rest}"
        assert bytes(t_.data) == src[name], t_.name


PG = ["prune-files", "m.gguf", "--remove", "1", "--out", "out.gguf"]
SNAP = f"cache/models--cbo-test--tiny-llama/snapshots/{REV}"

#: (id, setup(tmp, base), argv, exit code, a word the message must contain[, check(tmp) after a success])
CASES = [
    # --- containment: nothing is read from outside the model's own storage
    ("file-link-outside-relative", lambda t, b: link(t, "src/secret.txt", "../home/.ssh/id_rsa"), P, 2,
     "secret.txt"),
    ("file-link-outside-absolute", lambda t, b: link(t, "src/notes.md", t / "home" / ".ssh" / "id_rsa"), P, 2,
     "notes.md"),
    ("dir-link-outside", s_big_dir_link, P, 2, "extra"),
    ("link-chain-ends-outside", s_chain_outside, P, 2, "outside"),
    ("link-chain-leaves-and-returns", s_chain_out_and_back, P, 2, "tok.json"),
    ("link-in-subfolder-outside", lambda t, b: link(t, "src/extra/key", "../../home/.ssh/id_rsa"), P, 2,
     "extra/key"),
    ("readme-link-outside", lambda t, b: link(t, "src/README.md", "../home/.ssh/id_rsa"), P, 2, "README.md"),
    ("shard-link-outside", s_move_out_and_link("model.safetensors"), P, 2, "model.safetensors"),
    ("config-link-outside", s_move_out_and_link("config.json"), P, 2, "config.json"),
    ("dir-link-loop", lambda t, b: link(t, "src/again", "."), P, 2, "links back"),
    ("file-link-loop", lambda t, b: link(t, "src/self.json", "self.json"), P, 2, "loop"),
    ("broken-link", lambda t, b: link(t, "src/gone.json", "nothing-here.json"), P, 2, "broken"),
    ("fifo", s_fifo, P, 2, "FIFO"),
    ("hf-link-to-another-repo", s_hf_other_repo, ["prune-files", SNAP, "--remove", "1", "--out", "out"], 2,
     "outside"),
    ("out-inside-src", lambda t, b: None, ["prune-files", "src", "--remove", "1", "--out", "src/pruned"], 2,
     "inside"),
    ("out-contains-src", s_out_contains_src,
     ["prune-files", "work/src", "--remove", "1", "--out", "work", "--overwrite"], 2, "work"),
    # --- sizes and consistency checked against what the format declares
    ("truncated-shard", s_truncate, P, 2, "truncated"),
    ("garbage-shard", s_garbage, P, 2, "not a safetensors file"),
    ("index-missing-shard", s_index_missing_shard,
     ["prune-files", "sharded", "--remove", "1", "--out", "out"], 2, "model-00003-of-00005.safetensors"),
    ("index-tensor-not-in-its-shard", s_index_moved_tensor,
     ["prune-files", "sharded", "--remove", "1", "--out", "out"], 2, "model-00004-of-00005.safetensors"),
    ("index-shard-outside", s_index_outside, ["prune-files", "sharded", "--remove", "1", "--out", "out"], 2,
     "../home/x.safetensors"),
    ("block-lacks-a-tensor", lambda t, b: rewrite_single(t, lambda k: k == "model.layers.2.self_attn.q_proj.weight"),
     P, 2, "model.layers.2.self_attn.q_proj.weight"),
    ("block-lacks-a-norm", lambda t, b: rewrite_single(t, lambda k: k == "model.layers.3.input_layernorm.weight"),
     P, 2, "block 3"),
    ("block-missing-entirely", lambda t, b: rewrite_single(t, lambda k: k.startswith("model.layers.2.")), P, 2,
     "block(s) 2"),
    # --- GGUF: header and tensors must agree, the file must hold what it declares
    ("gguf-block-count-too-high", s_gguf(blocks=4, block_count=6), PG, 2, "llama.block_count says 6"),
    ("gguf-truncated", s_gguf_cut(frac=0.8), PG, 2, "truncated"),
    ("gguf-header-cut", s_gguf_cut(keep=40), PG, 2, "truncated"),
    ("gguf-empty", s_gguf_cut(keep=0), PG, 2, "truncated"),
    ("gguf-not-gguf", lambda t, b: (t / "m.gguf").write_bytes(b"PK\x03\x04" + os.urandom(3000)), PG, 2,
     "not a GGUF"),
    ("gguf-offset-beyond-end", s_gguf_offset_beyond, PG, 2, "m.gguf"),
    # --- what must keep working
    ("link-inside-src", s_link_inside, P, 0, "wrote", c_link_inside),
    ("hf-cache-snapshot", s_hf_ok, ["prune-files", SNAP, "--remove", "1", "--out", "out"], 0, "wrote", c_hf_ok),
    ("gguf-ok", s_gguf(), PG, 0, "wrote", c_gguf_ok),
]

SIDECARS = {"out.gguf": ("out.gguf.json",)}   # written next to an output file


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_inputs_are_refused_and_nothing_leaks(case, base, tmp_path, monkeypatch, capsys):
    cid, setup, argv, code, word, *check = case
    t = tmp_path
    (t / "home" / ".ssh").mkdir(parents=True)
    (t / "home" / ".ssh" / "id_rsa").write_bytes(KEY)
    shutil.copytree(base["single"], t / "src")
    setup(t, base)
    monkeypatch.chdir(t)
    monkeypatch.setenv("HOME", str(t / "home"))
    before = snapshot(t)
    rc = main(list(argv))
    cap = capsys.readouterr()
    assert rc == code, (cid, rc, cap.err[-2000:])
    assert "Traceback" not in cap.err and "Traceback" not in cap.out, cap.err[-3000:]
    stream = cap.err if code else cap.out
    assert word in stream, (cid, stream[-1500:])
    if code:
        assert cap.err.startswith("cbo prune-files: error: ") and cap.err.count("\n") == 1, cap.err
    after = snapshot(t)
    assert {k: v for k, v in after.items() if k in before} == before, cid   # every canary byte-identical
    new = sorted(set(after) - set(before))
    out = argv[argv.index("--out") + 1]
    if code:
        assert new == [], new   # refused before anything was written: no output, no temporary file
    else:
        assert all(k == out or k.startswith(f"{out}/") or k in SIDECARS.get(out, ()) for k in new), new
    for k in new:   # the outputs hold no link and nothing of the private key
        p = t / k
        assert not p.is_symlink(), k
        if p.is_file():
            assert CANARY not in p.read_bytes(), k
    if not code:
        assert out in after
        for fn in check:
            fn(t)


def test_there_are_enough_hostile_cases():
    assert sum(1 for c in CASES if c[3] != 0) >= 25 and sum(1 for c in CASES if c[3] == 0) >= 3


def test_the_output_is_never_inside_the_source_nor_around_it(base, tmp_path):
    from cbo_utils.prune.files import _check_apart

    snap = hf_cache(base["single"], tmp_path / "hub")
    root = storage_root(snap)
    with pytest.raises(ValueError, match="inside the source checkpoint's storage"):
        _check_apart(snap, root, root / "blobs" / "pruned")   # not into the cache repository either
    with pytest.raises(ValueError, match="contains the source checkpoint"):
        _check_apart(snap, root, tmp_path / "hub")
    _check_apart(snap, root, tmp_path / "elsewhere")
    (snap / "sub").mkdir()
    assert storage_root(snap / "sub") == root                  # a model in a sub-folder of a snapshot
    (tmp_path / "x" / "snapshots" / "r").mkdir(parents=True)   # not a cache repository: only the folder itself
    (tmp_path / "x" / "blobs").mkdir()
    assert storage_root(tmp_path / "x" / "snapshots" / "r") == (tmp_path / "x" / "snapshots" / "r").resolve()


# ------------------------------------------------------------------------------ the Hugging Face cache layout
def test_a_hugging_face_cache_snapshot_is_pruned_like_the_folder_and_equals_the_gated_model(base, tmp_path):
    from transformers import AutoModelForCausalLM

    snap = hf_cache(base["sharded"], tmp_path / "hub")
    assert all((snap / f).is_symlink() and not os.path.isabs(os.readlink(snap / f)) for f in os.listdir(snap))
    assert storage_root(snap) == (tmp_path / "hub" / "models--cbo-test--tiny-llama").resolve()
    remove = [1, 2]
    assert main(["prune-files", str(snap), "--remove", "1,2", "--out", str(tmp_path / "from_cache")]) == 0
    ref = prune_checkpoint_files(base["sharded"], remove, tmp_path / "from_folder")
    got = tmp_path / "from_cache"
    files = sorted(p.relative_to(got).as_posix() for p in got.rglob("*"))
    assert files == sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*"))
    for f in files:
        p = got / f
        assert not p.is_symlink(), f   # a folder to publish: regular files, no links into the cache
        if f not in ("removed_blocks.json", "README.md", ".cbo-manifest.json"):   # the source path, the time
            assert p.read_bytes() == (ref / f).read_bytes(), f
    rec = json.loads((got / "removed_blocks.json").read_text())
    assert rec["removed_blocks"] == remove and rec["skipped_files"] == []
    pruned = AutoModelForCausalLM.from_pretrained(got, dtype=torch.float32).eval()
    x = torch.randint(3, 200, (1, 13), generator=torch.Generator().manual_seed(0))
    model = base["model"]
    with torch.no_grad(), Gates(model) as g, g.removed(remove):
        expect = model(x).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, expect, rtol=0, atol=1e-5)
    assert pruned.config.num_hidden_layers == 2


# ------------------------------------------------------------------ blocks that differ by design are accepted
def _synthetic(folder: Path, drop: str | None = None, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A 4-block checkpoint whose blocks differ by design: block 0 a dense MLP, blocks 1-3 MoE (router, experts 0-1);
    block 2 linear attention, the others full attention; q_proj FP8-style with ``weight_scale`` (and a KV-cache
    ``k_scale``) on block 1 only, unquantised on block 0, GPTQ-style (``qweight``, ``scales``, ``qzeros``) on block 3.
    ``drop``: a tensor left out; ``extra``: tensors added."""
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.arange(12.0).reshape(6, 2),
                                  "model.norm.weight": torch.ones(2), "lm_head.weight": torch.full((6, 2), 3.0)}
    for i in range(4):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.full((2,), float(i))
        if i == 2:
            t[p + "linear_attn.in_proj.weight"] = torch.full((4, 2), 50.0)
            t[p + "linear_attn.A_log"] = torch.full((2,), -1.0)
        else:
            t[p + "self_attn.o_proj.weight"] = torch.full((2, 2), 100.0 + i)
            if i == 3:
                t[p + "self_attn.q_proj.qweight"] = torch.full((2, 1), i, dtype=torch.int32)
                t[p + "self_attn.q_proj.scales"] = torch.ones(2)
                t[p + "self_attn.q_proj.qzeros"] = torch.zeros(1, dtype=torch.int32)
            else:
                t[p + "self_attn.q_proj.weight"] = torch.full((2, 2), 10.0 + i)
            if i == 1:
                t[p + "self_attn.q_proj.weight_scale"] = torch.tensor(0.5)
                t[p + "self_attn.k_scale"] = torch.tensor(1.0)
        if i == 0:
            for m in ("gate_proj", "up_proj", "down_proj"):
                t[p + f"mlp.{m}.weight"] = torch.full((2, 2), 20.0 + i)
        else:
            t[p + "mlp.gate.weight"] = torch.full((2, 2), 30.0 + i)
            for e in range(2):
                for m in ("gate_proj", "up_proj", "down_proj"):
                    t[p + f"mlp.experts.{e}.{m}.weight"] = torch.full((2, 2), 40.0 + 10 * i + e)
    t.update(extra or {})
    t.pop(drop, None)
    folder.mkdir()
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "test_moe", "num_hidden_layers": 4}))
    return t


def test_blocks_that_differ_by_design_are_pruned_and_renumbered(tmp_path):
    src = _synthetic(tmp_path / "src")
    out = prune_checkpoint_files(tmp_path / "src", [1], tmp_path / "out")
    got = load_file(str(out / "model.safetensors"))
    new_of = {0: 0, 2: 1, 3: 2}
    expect = {}
    for k, v in src.items():
        if k.startswith("model.layers."):
            i, rest = k.split(".", 3)[2:]
            if int(i) == 1:
                continue
            k = f"model.layers.{new_of[int(i)]}.{rest}"
        expect[k] = v
    assert sorted(got) == sorted(expect)
    for k, v in expect.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


MISSING = [  # (id, the tensor left out or None, tensors added, the word of the message)
    ("an-expert", "model.layers.3.mlp.experts.1.down_proj.weight", None,
     "model.layers.3.mlp.experts.1.down_proj.weight"),
    ("the-router-of-the-linear-attention-block", "model.layers.2.mlp.gate.weight", None,
     "model.layers.2.mlp.gate.weight"),
    ("a-bias", None, {f"model.layers.{i}.self_attn.o_proj.bias": torch.zeros(2) for i in (0, 3)},
     "model.layers.1.self_attn.o_proj.bias"),
    ("the-dense-block-s-o-proj", "model.layers.0.self_attn.o_proj.weight", None,
     "model.layers.0.self_attn.o_proj.weight"),
    ("a-norm", "model.layers.3.input_layernorm.weight", None, "block 3 lacks"),
]


@pytest.mark.parametrize("cid,drop,extra,word", MISSING, ids=[m[0] for m in MISSING])
def test_a_block_that_lacks_what_its_peers_have_is_refused(tmp_path, cid, drop, extra, word):
    _synthetic(tmp_path / "src", drop=drop, extra=extra)
    with pytest.raises(ValueError, match="random weights") as e:
        prune_checkpoint_files(tmp_path / "src", [1], tmp_path / "out")
    assert word in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["src"]
