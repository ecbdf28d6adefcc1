"""A fork server for the testbed: import torch and p2pfl once, fork every node process from that.

Each node is still its own OS process running the real `p2pfl node` command (own pid, own session
and process group, killable and freezable like before), but the code pages and the imported heap
(torch, its compiler stack, networkx, scipy, the data set) are shared copy-on-write instead of being
loaded again by every node: at 128 nodes that is most of the machine's memory.

Protocol (one JSON object per line): the testbed writes `{"argv": [...], "log": PATH, "env": {...}}`
on the server's stdin; the server answers `{"pid": N}` (or `{"error": TEXT}`) on stdout and later
`{"exit": N, "code": C}` when that child ends (C as subprocess.Popen.returncode: -signal when killed).
The server ends when its stdin closes; the kernel then sends its children SIGTERM (PR_SET_PDEATHSIG),
as it does to the server when the testbed dies.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from p2pfl.faultlab import PARENT_PID_ENV, child_setup, pid_alive

__all__ = ["Zygote", "ZygoteChild", "ZygoteError", "preload", "serve"]


class ZygoteError(RuntimeError):
    """The fork server could not start or fork; the message says why (the testbed then execs nodes)."""


def preload(config: Path | None) -> None:
    """Import and warm everything a node needs, so forked nodes share it: with `config`, that node's
    task (data set, model, one optimizer step and evaluation); torch's global RNG is left as a fresh
    process has it, so a forked node trains exactly as an exec'd one."""
    import torch

    torch.set_num_threads(1)  # no intra-op pool before fork: OpenMP must not see threads it lost
    import p2pfl.cli
    import p2pfl.node  # noqa: F401  (the node's whole import graph)
    from p2pfl.config import load
    from p2pfl.learning import load_task
    from p2pfl.warmup import warm_training

    del p2pfl.cli
    with torch.random.fork_rng(devices=[]):
        if config is not None:
            task = load_task(load(config).task)
            warm_training(task, task.build_model())
        else:
            model = torch.nn.Linear(2, 2)
            torch.optim.SGD(model.parameters(), lr=0.0).step()


def _child(request: dict[str, Any], parent: int, closing: list[int]) -> None:
    """In the forked child: become a session leader, redirect output, run the node command, exit."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        for fd in closing:
            os.close(fd)
        os.setsid()
        child_setup(parent)()
        with open(request["log"], "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.environ.update({str(k): str(v) for k, v in request.get("env", {}).items()})
        os.environ[PARENT_PID_ENV] = str(parent)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        import numpy as np

        np.random.seed()  # a fresh process seeds numpy's global RNG from the OS (`random` reseeds itself)
        gc.enable()
        from p2pfl.cli import main

        code = main([str(a) for a in request["argv"]])
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _say(out: Any, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _reap(out: Any) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _say(out, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _requests(fd: int, pending: bytearray) -> tuple[list[bytes], bool]:
    """Complete request lines read from `fd` (several may arrive at once), and whether it closed."""
    data = os.read(fd, 1 << 16)
    pending.extend(data)
    *lines, rest = bytes(pending).split(b"\n")
    pending[:] = rest
    return lines, not data


def serve(config: Path | None = None) -> int:
    """Preload, then fork one child per request line until stdin closes."""
    parent = os.getppid()
    child_setup(parent)()
    preload(config)
    if threading.active_count() > 1:  # forking a threaded process could deadlock the children
        raise ZygoteError(f"{threading.active_count()} threads after preloading; cannot fork safely")
    out = sys.stdout
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    gc.disable()
    gc.freeze()  # the preloaded objects move out of the collector's reach: it would dirty their pages
    _say(out, {"ready": os.getpid()})
    me, stdin, pending = os.getpid(), sys.stdin.fileno(), bytearray()
    while True:
        readable, _, _ = select.select([stdin, wake_r], [], [], 1.0)
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        _reap(out)
        if stdin not in readable:
            continue
        lines, closed = _requests(stdin, pending)
        for line in lines:
            try:
                request = json.loads(line)
                pid = os.fork()
            except (ValueError, OSError) as exc:
                _say(out, {"error": str(exc)})
                continue
            if pid == 0:
                _child(request, me, [wake_r, wake_w])
            _say(out, {"pid": pid})
        if closed:
            return 0


# -- the testbed's side ------------------------------------------------------------------------------

READY_TIMEOUT_S = 600.0  # preloading imports torch and trains a step: minutes on a loaded machine
ANSWER_TIMEOUT_S = 120.0


class ZygoteChild(subprocess.Popen[bytes]):
    """A node forked by the server, with the Popen interface the testbed and fault lab use (pid,
    poll, wait, send_signal, kill, terminate, returncode). It is not our child, so its exit status
    comes from the server, which reaps it."""

    def __init__(self, server: Zygote, pid: int, args: list[str]) -> None:  # no Popen.__init__: no exec
        self._child_created = False  # Popen.__del__ then leaves it alone
        self.args, self.pid, self.returncode = args, pid, None
        self.stdin = self.stdout = self.stderr = None
        self._server = server

    def poll(self) -> int | None:
        self.returncode = self._server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


class Zygote:
    """The testbed's handle on a fork server: start it, fork nodes from it, close it."""

    def __init__(self, config: Path | None = None, log: Path | None = None) -> None:
        cmd = [sys.executable, "-m", "p2pfl.zygote", *([str(config)] if config else [])]
        with open(log or os.devnull, "ab") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # the terminal's Ctrl-C goes to the testbed, which stops nodes
            )
        self._answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self._exits: dict[int, int] = {}
        self._changed = threading.Condition()
        self._closed = False
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()
        answer = self._answer(READY_TIMEOUT_S)
        if "ready" not in answer:
            self.close()
            raise ZygoteError(f"the fork server did not start: {answer.get('error', answer)}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if "exit" in message:
                    with self._changed:
                        self._exits[int(message["exit"])] = int(message["code"])
                        self._changed.notify_all()
                else:
                    self._answers.put(message)
        with self._changed:  # the server is gone: its children got SIGTERM from the kernel
            self._closed = True
            self._changed.notify_all()
        self._answers.put({"error": "the fork server exited"})

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            return self._answers.get(timeout=timeout)
        except queue.Empty:
            return {"error": f"no answer within {timeout:g} s"}

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> ZygoteChild:
        """Fork one process running `p2pfl ARGV`, its output appended to `log`."""
        request = json.dumps({"argv": argv, "log": str(log), "env": env or {}}) + "\n"
        with self._lock:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(request.encode())
                self.proc.stdin.flush()
            except (OSError, ValueError) as exc:
                raise ZygoteError(f"the fork server is gone ({exc})") from exc
            answer = self._answer(ANSWER_TIMEOUT_S)
        if "pid" not in answer:
            raise ZygoteError(f"the fork server could not fork: {answer.get('error', answer)}")
        return ZygoteChild(self, int(answer["pid"]), ["p2pfl", *argv])

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            if pid in self._exits:
                return self._exits[pid]
            if self._closed and not pid_alive(pid):
                return -int(signal.SIGTERM)
            return None

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                code = self.exit_code(pid)
                left = None if deadline is None else deadline - time.monotonic()
                if code is not None or (left is not None and left <= 0):
                    return code
                self._changed.wait(timeout=min(left, 1.0) if left is not None else 1.0)

    def close(self, timeout: float = 10.0) -> None:
        """End the server (its remaining children get SIGTERM from the kernel)."""
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout)


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
