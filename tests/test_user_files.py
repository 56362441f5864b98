"""Nothing of the user's is touched or copied (issue 23): ownership by the record cbo writes, temporary files that are
ours, resumes that resume.

The table ``CASES`` runs each hostile case through ``cbo_utils.cli.main`` in-process, in a fresh folder with a fake
home folder holding a private key; it asserts the exit code, the subject of the message and that every file that
existed before (the user's canaries, the inputs, the home folder) is byte-identical afterwards and that nothing new
appeared except the outputs a case expects."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cbo_utils import cli
from cbo_utils.core import tempfiles
from cbo_utils.core.artifacts import MANIFEST, read_manifest

T = ("--model", "tiny-llama")
KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot a real key\n"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Outputs of cbo itself (copied into each case's folder): gradients, a states table, a pruned export."""
    d = tmp_path_factory.mktemp("made")
    assert cli.main(["gradients", *T, "--samples", "4", "--max-tokens", "16", "--out", str(d / "grads"),
                     "--quiet"]) == 0
    assert cli.main(["solve", "--hessian", str(d / "grads"), "-M", "2", "-k", "3", "--out", str(d / "s.csv")]) == 0
    assert cli.main(["prune", *T, "--remove", "1", "--out", str(d / "export"), "--no-verify"]) == 0
    return d


def snapshot(root: Path) -> dict[str, bytes]:
    """Every entry below ``root``: file bytes, a link's target, or a folder marker."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if "__pycache__" in p.parts:
            continue
        if p.is_symlink():
            out[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).digest()
        else:
            out[rel] = b"<dir>"
    return out


def copy_made(made: Path, work: Path, *names: str) -> None:
    for n in names:
        src = made / n
        if src.is_dir():
            shutil.copytree(src, work / n, symlinks=True)
        else:
            shutil.copy2(src, work / n)
            if (made / f"{n}.json").is_file():
                shutil.copy2(made / f"{n}.json", work / f"{n}.json")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@dataclass
class Case:
    id: str
    argv: list[str]
    code: int
    word: str
    setup: Callable[[Path, Path, Path], None] | None = None   # (work, home, made)
    new: tuple[str, ...] = ()       # globs (relative to the case's root) of what may appear
    gone: tuple[str, ...] = ()      # globs of what may change or disappear
    must_go: bool = False           # … and must be gone afterwards (a dead run's temporary files)


def user_folder(*files: str, name: str = "runs"):
    def setup(work, home, made):
        for f in files:
            p = work / name / f
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"the user's {f}\n")
    return setup


def export_with(*extra: str, edit: str | None = None):
    def setup(work, home, made):
        copy_made(made, work, "export")
        for f in extra:
            p = work / "export" / f
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("mine\n")
        if edit:
            with open(work / "export" / edit, "a") as fh:
                fh.write("\n")
    return setup


def planted_marker(work, home, made):
    """A folder of the user's with cbo's marker files copied into it (no manifest)."""
    d = work / "planted"
    d.mkdir()
    for f in ("removed_blocks.json", "compress.json", "config.json"):
        shutil.copy2(made / "export" / f, d / f) if (made / "export" / f).is_file() else (d / f).write_text("{}")
    (d / "thesis.tex").write_text("mine\n")


def planted_above_home(work, home, made):
    """A manifest and a removed_blocks.json planted in the folder that contains the home folder."""
    root = home.parent
    shutil.copy2(made / "export" / "removed_blocks.json", root / "removed_blocks.json")
    shutil.copy2(made / "export" / MANIFEST, root / MANIFEST)


def forged_manifest(work, home, made):
    """A folder of the user's with a manifest that lists its files with other content."""
    copy_made(made, work, "export")
    d = work / "forged"
    d.mkdir()
    man = read_manifest(work / "export")
    for rel in man["files"]:
        (d / rel).write_text("mine\n")
    (d / MANIFEST).write_text(json.dumps(man))


def user_csv_with_sidecar(name: str, sidecar: str = "user"):
    def setup(work, home, made):
        (work / name).write_text("a,b\n1,2\n")
        if sidecar == "user":
            (work / f"{name}.json").write_text('{"note": "my own metadata"}\n')
        else:   # a sidecar cbo wrote for another file, copied beside the user's
            shutil.copy2(made / "s.csv.json", work / f"{name}.json")
    return setup


def grads_and(extra: Callable | None = None):
    def setup(work, home, made):
        copy_made(made, work, "grads")
        if extra:
            extra(work)
    return setup


def truncated_gradients(work, home, made):
    copy_made(made, work, "grads")
    st = work / "grads" / "gradients.safetensors"
    st.write_bytes(st.read_bytes()[:100])


def emptied_states(work, home, made):
    copy_made(made, work, "grads", "s.csv")
    (work / "s.csv").write_text("")


def forged_gradients(work, home, made):
    """A user's file named gradients.safetensors with a sidecar cbo wrote for another one copied beside it."""
    (work / "g").mkdir()
    (work / "g" / "gradients.safetensors").write_bytes(b"my data")
    shutil.copy2(made / "grads" / "gradients.safetensors.json", work / "g" / "gradients.safetensors.json")


def link_to_home_key(work, home, made):
    (work / "mine").mkdir()
    (work / "mine" / "id_ed25519").symlink_to(home / ".ssh" / "id_ed25519")


def out_link_to_user_dir(work, home, made):
    copy_made(made, work, "export")
    (work / "precious").mkdir()
    (work / "precious" / "data.txt").write_text("mine\n")
    (work / "link").symlink_to(work / "precious")


def temp_of(target: str, owner: str, kind: str = "dir"):
    """A temporary sibling of ``target`` in cbo's naming with the given owner token."""
    def setup(work, home, made):
        p = work / f".{target}.{tempfiles.TAG}.{owner}.abcd1234"
        if kind == "dir":
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"half" * 100)
        else:
            p.write_bytes(b"half")
    return setup


def live_other_run(work, home, made):
    """Another live run writing --out p.v2 (its owner: this test's parent process, alive) and one writing p."""
    owner = tempfiles.owner_token(os.getppid())
    temp_of("p.v2", owner)(work, home, made)
    temp_of("p", owner)(work, home, made)


def dead_run(work, home, made):
    temp_of("p", tempfiles.owner_token(os.getpid()).rsplit("-", 2)[0] + f"-{dead_pid()}-1")(work, home, made)


def other_host_run(work, home, made):
    temp_of("p", f"0badc0de-{dead_pid()}-1")(work, home, made)


def gguf_source(work: Path) -> None:
    from test_containment import tiny_gguf  # a small llama GGUF written with gguf.GGUFWriter

    tiny_gguf(work / "m.gguf")


def student_of_other_model(work: Path) -> None:
    """A pruned folder of the same class and depth as tiny-llama's, pruned from a model with other weights."""
    import torch

    from cbo_utils.model.tiny import build_tiny

    model, tok = build_tiny("tiny-llama")
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(work / "other")
    tok.save_pretrained(work / "other")
    assert cli.main(["prune", "--model", str(work / "other"), "--remove", "1", "--out", str(work / "student"),
                     "--no-verify"]) == 0


RETRAIN = ["retrain", "--teacher", "tiny-llama", "--remove", "1", "--max-steps", "1", "--batch-size", "2",
           "--micro-batch-size", "2", "--samples", "8", "--max-length", "32", "--warmup-steps", "0"]
SOLVE = ["solve", "--hessian", "grads", "-M", "2", "-k", "3"]
NOT_OURS = "not a folder cbo wrote"

CASES = [
    # --- ownership: a folder is cbo's by its manifest, never by a file name -------------------------------------
    Case("retrain-user-checkpoint", [*RETRAIN, "--out", "runs"], 2, NOT_OURS, user_folder("checkpoint/epoch3.bin")),
    Case("retrain-user-config", [*RETRAIN, "--out", "runs"], 2, NOT_OURS, user_folder("config.json")),
    Case("retrain-user-train-log", [*RETRAIN, "--out", "runs"], 2, NOT_OURS, user_folder("train_log.csv")),
    Case("retrain-user-retraining-json", [*RETRAIN, "--out", "runs"], 2, NOT_OURS,
         user_folder("retraining.json", "distill_run.json")),
    Case("retrain-user-files-overwrite", [*RETRAIN, "--out", "runs", "--overwrite"], 2, NOT_OURS,
         user_folder("checkpoint/epoch3.bin", "config.json")),
    Case("retrain-into-export", [*RETRAIN, "--out", "export"], 2, "another kind", export_with()),
    Case("prune-overwrite-user-notes", ["prune", *T, "--remove", "2", "--out", "export", "--overwrite"], 2,
         "notes.txt", export_with("notes.txt")),
    Case("prune-overwrite-user-subfolder", ["prune", *T, "--remove", "2", "--out", "export", "--overwrite"], 2,
         "my_lora", export_with("my_lora/adapter_model.safetensors")),
    Case("prune-overwrite-user-empty-folder", ["prune", *T, "--remove", "2", "--out", "export", "--overwrite"], 2,
         "keep/", lambda w, h, m: (export_with()(w, h, m), (w / "export" / "keep").mkdir())),
    Case("prune-overwrite-edited-config", ["prune", *T, "--remove", "2", "--out", "export", "--overwrite"], 2,
         "config.json", export_with(edit="config.json")),
    Case("prune-overwrite-planted-markers", ["prune", *T, "--remove", "2", "--out", "planted", "--overwrite"], 2,
         MANIFEST, planted_marker),
    Case("prune-files-overwrite-planted", ["prune-files", "export", "--remove", "2", "--out", "planted",
                                           "--overwrite"], 2, MANIFEST,
         lambda w, h, m: (export_with()(w, h, m), planted_marker(w, h, m))),
    Case("prune-overwrite-forged-manifest", ["prune", *T, "--remove", "2", "--out", "forged", "--overwrite"], 2,
         "changed since", forged_manifest),
    Case("prune-overwrite-above-home", ["prune", *T, "--remove", "2", "--out", "{users}", "--overwrite"], 2,
         "home directory", planted_above_home),
    Case("prune-overwrite-home", ["prune", *T, "--remove", "2", "--out", "{home}", "--overwrite"], 2,
         "home directory"),
    Case("prune-overwrite-cwd", ["prune", *T, "--remove", "2", "--out", ".", "--overwrite"], 2, "current directory"),
    Case("prune-overwrite-link", ["prune", *T, "--remove", "2", "--out", "link", "--overwrite"], 2,
         "symbolic link", out_link_to_user_dir),
    Case("prune-files-overwrite-user-notes", ["prune-files", "export", "--remove", "2", "--out", "other",
                                              "--overwrite"], 2, "notes.txt",
         lambda w, h, m: (export_with()(w, h, m), shutil.copytree(w / "export", w / "other"),
                          (w / "other" / "notes.txt").write_text("mine\n"))),
    Case("solve-overwrite-user-csv-with-sidecar", [*SOLVE, "--out", "data.csv", "--overwrite"], 2, "data.csv",
         grads_and(lambda w: user_csv_with_sidecar("data.csv")(w, None, None))),
    Case("solve-overwrite-copied-cbo-sidecar", [*SOLVE, "--out", "data.csv", "--overwrite"], 2, "data.csv",
         lambda w, h, m: (copy_made(m, w, "grads", "s.csv"), user_csv_with_sidecar("data.csv", "cbo")(w, h, m))),
    Case("baseline-overwrite-user-csv", ["baseline", *T, "--method", "bi", "-M", "1", "--out", "data.csv",
                                         "--overwrite"], 2, "data.csv", user_csv_with_sidecar("data.csv")),
    Case("gradients-overwrite-forged", ["gradients", *T, "--samples", "2", "--max-tokens", "16", "--out", "g",
                                        "--overwrite", "--quiet"], 2, "gradients.safetensors", forged_gradients),
    Case("compare-results-user-folder", ["compare", "--profile", "tiny", "--results", "userdir", "--stages",
                                         "report"], 2, NOT_OURS, user_folder("selections.csv", name="userdir")),
    Case("hybrid-results-user-folder", ["hybrid", "--profile", "tiny", "--results", "userdir"], 2, NOT_OURS,
         user_folder("hybrid/states.csv", name="userdir")),
    Case("compress-out-user-folder", ["compress", *T, "-M", "1", "--out", "userdir", "--method", "bi"], 2,
         NOT_OURS, user_folder("notes.txt", name="userdir")),
    Case("compress-out-planted-compress-json", ["compress", *T, "-M", "1", "--out", "planted", "--method", "bi"], 2,
         NOT_OURS, planted_marker),
    Case("compress-out-export", ["compress", *T, "-M", "1", "--out", "export", "--method", "bi"], 2,
         "another kind", export_with()),
    Case("compress-out-file", ["compress", *T, "-M", "1", "--out", "afile", "--method", "bi"], 2, "afile",
         lambda w, h, m: (w / "afile").write_text("mine\n")),
    # --- integrity: a truncated or emptied artifact is never "up to date" ----------------------------------------
    Case("gradients-truncated-not-up-to-date", ["gradients", *T, "--samples", "4", "--max-tokens", "16", "--out",
                                                "grads", "--quiet"], 2, "truncated", truncated_gradients),
    Case("solve-emptied-states-not-up-to-date", [*SOLVE, "--out", "s.csv"], 2, "not what cbo wrote",
         emptied_states),
    Case("solve-truncated-gradients-input", [*SOLVE, "--out", "new.csv"], 2, "gradients.safetensors",
         truncated_gradients),
    # --- containment: links are not followed out of a source ---------------------------------------------------
    Case("prune-files-link-to-home-key", ["prune-files", "mine", "--remove", "1", "--out", "o"], 2, "id_ed25519",
         lambda w, h, m: (export_with()(w, h, m), shutil.copytree(w / "export", w / "mine"),
                          (w / "mine" / "id_ed25519").symlink_to(h / ".ssh" / "id_ed25519"))),
    # --- temporary files: only a dead owner's are removed --------------------------------------------------------
    Case("prune-keeps-a-live-runs-temporaries", ["prune", *T, "--remove", "1", "--out", "p", "--no-verify"], 0,
         "", live_other_run, new=("p", "p/*")),
    Case("prune-removes-a-dead-runs-temporary", ["prune", *T, "--remove", "1", "--out", "p", "--no-verify"], 0,
         "", dead_run, new=("p", "p/*"), gone=(f".p.{tempfiles.TAG}.*", f".p.{tempfiles.TAG}.*/*"), must_go=True),
    Case("prune-keeps-another-hosts-temporary", ["prune", *T, "--remove", "1", "--out", "p", "--no-verify"], 0,
         "", other_host_run, new=("p", "p/*")),
    Case("gguf-removes-a-dead-writes-temporary", ["prune-files", "m.gguf", "--remove", "1", "--out", "p.gguf"], 0,
         "", lambda w, h, m: (gguf_source(w), temp_of("p.gguf", f"{tempfiles.owner_token().split('-')[0]}-"
                                                                f"{dead_pid()}-1", "file")(w, h, m)),
         new=("p.gguf", "p.gguf.json"), gone=(f".p.gguf.{tempfiles.TAG}.*",), must_go=True),
    Case("gguf-keeps-a-live-writes-temporary", ["prune-files", "m.gguf", "--remove", "1", "--out", "p.gguf"], 0,
         "", lambda w, h, m: (gguf_source(w), temp_of("p.gguf", tempfiles.owner_token(os.getppid()), "file")(w, h, m)),
         new=("p.gguf", "p.gguf.json")),
    Case("gguf-overwrite-users-file", ["prune-files", "m.gguf", "--remove", "1", "--out", "mine.gguf",
                                       "--overwrite"], 2, "mine.gguf",
         lambda w, h, m: (gguf_source(w), (w / "mine.gguf").write_bytes(b"GGUF mine"),
                          (w / "mine.gguf.json").write_text("{}"))),
    Case("retrain-student-of-another-teacher", ["retrain", "--teacher", "tiny-llama", "--student", "student",
                                                 "--max-steps", "2", "--out", "r"], 2, "was not pruned from",
         lambda w, h, m: student_of_other_model(w)),
    # --- and what cbo wrote itself is replaced with --overwrite --------------------------------------------------
    Case("prune-overwrite-own-export", ["prune", *T, "--remove", "2", "--out", "export", "--overwrite",
                                        "--no-verify"], 0, "", export_with(), new=("export/*",),
         gone=("export/*",)),
    Case("solve-overwrite-own-states", [*SOLVE, "-k", "2", "--out", "s.csv", "--overwrite"], 0, "",
         lambda w, h, m: copy_made(m, w, "grads", "s.csv"), gone=("s.csv", "s.csv.json"),
         new=("s.csv", "s.csv.json")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_nothing_of_the_users_is_touched(case: Case, made, tmp_path, monkeypatch, capsys):
    root = tmp_path
    home, work = root / "users" / "me", root / "work"   # the home folder's parent is not the current folder's
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_bytes(KEY)
    (home / "notes.txt").write_text("the user's home\n")
    work.mkdir()
    (work / "canary.txt").write_text("keep me\n")
    if case.setup:
        case.setup(work, home, made)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    before = snapshot(root)
    argv = [a.replace("{home}", str(home)).replace("{users}", str(home.parent)) for a in case.argv]
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == case.code, (rc, err[-2000:])
    assert "Traceback" not in err
    assert case.word in err, err[-1500:]
    after = snapshot(root)

    def matches(rel: str, globs) -> bool:
        return any(fnmatch.fnmatch(rel, "work/" + g) for g in globs)

    changed = [p for p, h in before.items() if after.get(p) != h and not matches(p, case.gone)]
    appeared = [p for p in after if p not in before and not matches(p, case.new)]
    assert not changed, f"changed or removed: {changed}"
    assert not appeared, f"appeared: {appeared}"
    if case.must_go:
        assert [p for p in before if matches(p, case.gone)] and not [p for p in after if matches(p, case.gone)]
    assert KEY not in b"".join((root / p).read_bytes() for p in after if p not in before
                               and (root / p).is_file() and not (root / p).is_symlink())
    assert not tempfiles.live_temporaries()


def test_the_table_has_at_least_60_cases_with_the_other_tables():
    import test_containment
    import test_validation  # the containment and validation tables of issue 23 (same folder)

    assert len(CASES) + len(test_containment.CASES) + len(test_validation.CASES) >= 60


# ------------------------------------------------------------------------------------------------ resumes
STEPS_OF_COMPRESS = ["select", "prune", "measure"]


@pytest.mark.parametrize("step", STEPS_OF_COMPRESS)
def test_compress_interrupted_at_each_step_resumes_as_promised(step, tmp_path, monkeypatch, capsys):
    """Ctrl-C inside each step: the message says what a rerun does, and the rerun does it (finishes, without
    redoing the finished steps)."""
    import cbo_utils.experiments.compress as comp

    target = {"select": "run_method", "prune": "save_pruned", "measure": "_measure"}[step]
    real = getattr(comp, target)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(comp, target, interrupted)
    monkeypatch.chdir(tmp_path)
    argv = ["compress", *T, "-M", "1", "--out", "c", "--method", "bi", "--samples", "4", "--max-tokens", "16"]
    assert cli.main(argv) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "rerun the same command: it resumes in c" in err, err
    done_before = list(json.loads((tmp_path / "c" / "compress.json").read_text())["steps"])
    monkeypatch.setattr(comp, target, real)
    calls = []
    monkeypatch.setattr(comp, "run_method", lambda *a, **k: calls.append("select") or real_run(*a, **k))
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert ("select" in calls) == ("select" not in done_before)
    assert (tmp_path / "c" / "summary.md").is_file()
    assert not [p for p in (tmp_path / "c").rglob("*") if tempfiles.TAG in p.name]


def real_run(*a, **k):
    from cbo_utils.select.methods import run_method

    return run_method(*a, **k)


def test_solve_interrupted_before_its_first_checkpoint_says_so(tmp_path, made, monkeypatch, capsys):
    import cbo_utils.solvers.heuristics as heur

    copy_made(made, tmp_path, "grads")
    monkeypatch.chdir(tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(heur, "solve", interrupted)
    assert cli.main([*SOLVE, "--out", "s.csv", "--checkpoint", "ck.safetensors"]) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "was not saved yet" in err and "starts the enumeration over" in err and "resumes" not in err
    (tmp_path / "ck.safetensors").write_bytes(b"x")   # had it been saved, the message would say it resumes
    assert cli.main([*SOLVE, "--out", "s.csv", "--checkpoint", "ck.safetensors"]) == cli.EXIT_INTERRUPTED
    assert "resumes from ck.safetensors" in capsys.readouterr().err


def test_retrain_interrupted_says_whether_it_resumes(tmp_path, monkeypatch, capsys):
    import cbo_utils.prune.distill as dist

    monkeypatch.chdir(tmp_path)
    real = dist._train_step
    count = {"n": 0}

    def step(*a, **k):
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(dist, "_train_step", step)
    argv = [*RETRAIN[:RETRAIN.index("--max-steps")], "--max-steps", "3", "--save-every", "1", "--batch-size", "2",
            "--micro-batch-size", "2", "--samples", "8", "--max-length", "32", "--warmup-steps", "0", "--out", "r"]
    assert cli.main(argv) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "resumes from r/checkpoint (step 1)" in err, err
    monkeypatch.setattr(dist, "_train_step", real)
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "r" / "retraining.json").is_file() and not (tmp_path / "r" / "checkpoint").exists()
    assert not [p for p in (tmp_path / "r").rglob("*") if tempfiles.TAG in p.name]


# ------------------------------------------------------------------------------------ signals and temporaries
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "CBO_DEBUG": "", "PYTHONWARNINGS": "ignore"}


def _default_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def export_stopped_after_saving(tmp_path: Path) -> subprocess.Popen:
    """``cbo prune … --out p`` in a subprocess, held inside save_pretrained (a sitecustomize hook) once the partial
    weights are in its temporary folder."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time, transformers\n"
        "orig = transformers.PreTrainedModel.save_pretrained\n"
        "def slow(self, d, *a, **k):\n"
        "    orig(self, d, *a, **k)\n"
        "    print('SAVED', flush=True)\n"
        "    time.sleep(60)\n"
        "transformers.PreTrainedModel.save_pretrained = slow\n")
    env = {**ENV, "PYTHONPATH": f"{hook}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    # under nohup (or a CI runner that ignores them) SIGHUP/SIGTERM start ignored, and cbo keeps an ignored signal
    # ignored: give the child the default dispositions a terminal would
    p = subprocess.Popen([sys.executable, "-m", "cbo_utils.cli", "prune", *T, "--remove", "1", "--out", "p"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=_default_signals)
    for line in p.stdout:
        if line.startswith("SAVED"):
            break
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_an_export_leaves_no_temporary_files(sig, tmp_path):
    """The export is slowed inside save_pretrained (a sitecustomize hook), the signal arrives while the temporary
    folder holds partial weights: nothing is left behind, the exit status is 128 + the signal."""
    p = export_stopped_after_saving(tmp_path)
    assert [q for q in tmp_path.iterdir() if tempfiles.TAG in q.name], "the partial export should exist now"
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err[-2000:]
    assert signal.Signals(sig).name in err and "Traceback" not in err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["hook"]


def test_a_killed_export_is_cleaned_by_the_next_run_and_only_its_own(tmp_path):
    """SIGKILL cannot be caught: the dead run's temporary folder stays until the next run for the same output,
    which removes it (its owner is dead) and leaves a live run's and another output's alone."""
    p = export_stopped_after_saving(tmp_path)
    p.kill()
    p.wait(timeout=30)
    left = [q for q in tmp_path.iterdir() if tempfiles.TAG in q.name]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()
    live = tmp_path / f".p.{tempfiles.TAG}.{tempfiles.owner_token(os.getpid())}.0000"
    live.mkdir()   # a live run (this process) writing the same output
    other = tmp_path / f".p.v2.{tempfiles.TAG}.{left[0].name.split(tempfiles.TAG + '.')[1]}"
    other.mkdir()  # a dead run of another output: not this run's to judge
    r = subprocess.run([sys.executable, "-m", "cbo_utils.cli", "prune", *T, "--remove", "1", "--out", "p",
                        "--no-verify"], cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not left[0].exists() and live.is_dir() and other.is_dir()


def test_the_manifest_is_written_last_and_lists_every_file(made):
    man = read_manifest(made / "export")
    files = {str(p.relative_to(made / "export")) for p in (made / "export").rglob("*") if p.is_file()}
    assert set(man["files"]) == files - {MANIFEST}
    assert all(len(e["sha256"]) == 64 for e in man["files"].values())
    assert man["output"] == "pruned_model"
    assert time.time() >= (made / "export" / MANIFEST).stat().st_mtime >= max(
        (made / "export" / f).stat().st_mtime for f in man["files"])
