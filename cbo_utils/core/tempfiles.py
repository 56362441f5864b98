"""Temporary files and folders that are ours: the one place that makes them, knows their owner, and cleans them.

Every temporary path is a hidden sibling of the output it will become, named

    .<output name>.cbo-tmp.<host>-<pid>-<process start>.<random>

so that it is unique, so that the process that owns it can be told from its name (host hash, process id and the
process's start time — a recycled pid is not mistaken for the owner), and so that a sibling of *another* output is
never matched (``.p.cbo-tmp.`` is not a prefix of ``.p.v2.cbo-tmp.…``). A process removes what it registered on every
exit path — normal return, exceptions, ``atexit``, and SIGTERM / SIGHUP once :func:`install_signal_handlers` has
turned them into :class:`Terminated` — and, when it starts writing an output, removes only the stale temporary
siblings of that output whose owner process is dead on this host (:func:`clean_stale`), never a live run's.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import secrets
import shutil
import signal
import socket
import threading
from pathlib import Path

TAG = "cbo-tmp"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_LIVE: set[Path] = set()
_LOCK = threading.Lock()


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised in the main thread so that every ``finally`` / ``except BaseException``
    cleans up as on Ctrl-C (a plain ``except Exception`` does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _start_ticks(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (field 22 of ``/proc/<pid>/stat``), or ``"0"``
    where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def owner_token(pid: int | None = None) -> str:
    """``<host>-<pid>-<start>`` of this process (or ``pid``): what a temporary name records of its owner."""
    pid = os.getpid() if pid is None else pid
    return f"{_HOST}-{pid}-{_start_ticks(pid)}"


def _prefix(target: Path) -> str:
    return f".{target.name}.{TAG}."


def temp_path(target) -> Path:
    """A fresh temporary name beside ``target`` (nothing is created; see :func:`temp_file`, :func:`temp_dir`)."""
    target = Path(target)
    return target.parent / f"{_prefix(target)}{owner_token()}.{secrets.token_hex(4)}"


def _register(p: Path) -> Path:
    with _LOCK:
        _LIVE.add(p)
    return p


def temp_file(target) -> tuple[int, Path]:
    """Create a temporary file beside ``target`` exclusively (``O_EXCL``); returns ``(fd, path)``, registered for
    clean-up until :func:`release` (after it was renamed into place) or :func:`discard`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        p = temp_path(target)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue
        return fd, _register(p)


def temp_dir(target, mode: int = 0o755) -> Path:
    """Create a temporary folder beside ``target`` (registered, as :func:`temp_file`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        p = temp_path(target)
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:  # pragma: no cover
            continue
        os.chmod(p, mode)   # mkdir honours the umask; the final folder gets ordinary permissions
        return _register(p)


def release(p) -> None:
    """``p`` was renamed into place (or handed over): no longer ours to clean."""
    with _LOCK:
        _LIVE.discard(Path(p))


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


def discard(p) -> None:
    """Delete the temporary ``p`` (a file, or a folder without following links) and forget it."""
    p = Path(p)
    _remove(p)
    release(p)


def live_temporaries() -> list[Path]:
    """What this process has registered and not yet released (for tests and diagnostics)."""
    with _LOCK:
        return sorted(_LIVE)


def cleanup_all() -> None:
    """Remove every temporary this process still owns (``atexit``; the signal path)."""
    with _LOCK:
        paths = list(_LIVE)
        _LIVE.clear()
    for p in paths:
        _remove(p)


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass   # someone else's live process
    except OSError:  # pragma: no cover
        return True
    return start == "0" or _start_ticks(pid) in ("0", start)


def owner_of(p) -> tuple[str, int, str] | None:
    """``(host, pid, start)`` recorded in the temporary name ``p``, or None when ``p`` is not one of ours."""
    name = Path(p).name
    if f".{TAG}." not in name:
        return None
    token = name.rsplit(f".{TAG}.", 1)[1].split(".", 1)[0]
    parts = token.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def remove_if_stale(p) -> bool:
    """Remove ``p`` when it is a temporary of ours whose owner process on this host is dead; whether it was."""
    p = Path(p)
    owner = owner_of(p)
    if owner is None or p.is_symlink() or owner[0] != _HOST or _alive(owner[1], owner[2]):
        return False
    _remove(p)
    return True


def clean_stale(target) -> list[Path]:
    """Remove the temporary siblings of ``target`` that a process on this host left when it died (killed, power
    cut); a live owner's (another run writing the same output now) and other hosts' are kept. Returns what was
    removed."""
    target = Path(target)
    gone: list[Path] = []
    if not target.parent.is_dir():
        return gone
    prefix = _prefix(target)
    for p in target.parent.iterdir():
        if p.name.startswith(prefix) and remove_if_stale(p):
            gone.append(p)
    return gone


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` in the main thread (the command line does this; a library
    caller keeps its own handlers). Signals that are ignored (``nohup``) stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _raise_terminated)


atexit.register(cleanup_all)
