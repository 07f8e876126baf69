"""Runs untrusted Python (LLM-written programs, code under test) isolated from the daemon and the host.

Each run is a fresh interpreter inside bubblewrap (`bwrap`, Debian's `bubblewrap`): new PID, network,
IPC, UTS and mount namespaces; a root filesystem that holds only the system's and Python's files,
read-only, and an empty private tmpfs as the working folder; an empty environment; an unprivileged
user without capabilities; CPU, address-space, file-size, open-file and process limits. So a program
cannot read the daemon's secrets (its environment, `/proc/<ppid>/environ`: other processes are not even
visible), open a socket to anything (there is no network but a loopback that is down), write a file
that outlives it, or leave a process behind: when the program ends or its time is up, the PID
namespace's init is killed and the kernel kills every process in it.

The process limit is enforced per user id, and never for uid 0, so the program must not run as root:
when the daemon is root, bubblewrap runs privileged (no user namespace) and the bootstrap drops to
`SANDBOX_UID` before anything untrusted runs; otherwise bubblewrap maps the daemon's own uid into a new
user namespace. Without bubblewrap (or where it cannot create namespaces) nothing runs:
`SandboxUnavailable` says why. A semaphore bounds how many programs run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel

SANDBOX_UID = 65534  # "nobody"
TMP_BYTES = 16 << 20  # the private folder is a tmpfs of this size
FILE_BYTES = 1 << 20
OPEN_FILES = 64
INSTALL_HINT = (
    "install Debian's bubblewrap package (`apt-get install bubblewrap`; `make setup` does it as root)"
)

# Runs first in the sandbox: drop root if bubblewrap ran privileged, set the limits, then run the source,
# which comes first on stdin (its length in bytes on a line, then the source).
_BOOTSTRAP = r"""
import os, resource, sys
cpu, memory, processes, uid, files, size = (int(a) for a in sys.argv[1:7])
if os.getuid() == 0:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_NOFILE, files),
                     (resource.RLIMIT_FSIZE, size)):
    resource.setrlimit(limit, (value, value))
source = sys.stdin.buffer.read(int(sys.stdin.buffer.readline())).decode()  # the rest is the program's
sys.argv = ["program"]
exec(compile(source, "<program>", "exec"), {"__name__": "__main__"})
"""


class SandboxUnavailable(RuntimeError):
    """No isolation on this machine: programs are refused, never run unisolated."""


# Loads the code, then runs each test on its own; `assert call == expected` reports what the call gave.
_TEST_HARNESS = r"""
import ast, json
CODE, TESTS = json.loads(__import__("sys").stdin.read())
namespace = {"__name__": "solution"}
exec(compile(CODE, "<solution>", "exec"), namespace)
results = []
for test in TESTS:
    try:
        exec(compile(test, "<test>", "exec"), dict(namespace))
        results.append(None)
    except AssertionError as error:
        message = str(error)
        node = ast.parse(test).body[0]
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1:
            try:
                got = eval(ast.unparse(node.test.left), dict(namespace))
                message = f"got {got!r}, expected {ast.unparse(node.test.comparators[0])}"
            except Exception as inner:
                message = f"{type(inner).__name__}: {inner}"
        results.append(["AssertionError", message[:300]])
    except Exception as error:
        results.append([type(error).__name__, str(error)[:300]])
print("\x1eRESULTS" + json.dumps(results))
"""

_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)
_ERROR_LINE = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception|Exit|Interrupt|Warning)):?\s?(.*)$")


def extract_code(text: str) -> str:
    """The first fenced code block of an LLM's reply, or the whole reply when it has none."""
    match = _CODE_BLOCK.search(text)
    return (match.group(1) if match else text).strip("\n")


class ProgramRun(BaseModel):
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def error(self) -> tuple[str, str]:
        """(exception class, message) from the traceback's last line; ('Timeout', ...) on a timeout."""
        if self.timed_out:
            return "Timeout", "the program ran out of time"
        for line in reversed(self.stderr.strip().splitlines()):
            match = _ERROR_LINE.match(line.strip())
            if match:
                return match.group(1).rsplit(".", 1)[-1], match.group(2)
        return "ProgramError", f"exit code {self.exit_code}"


class TestOutcome(BaseModel):
    test: str
    passed: bool
    error_type: str = ""
    message: str = ""


class TestReport(BaseModel):
    """Per-test outcomes; `error` is set instead when the code could not even be loaded or timed out."""

    outcomes: list[TestOutcome]
    error: tuple[str, str] | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(outcome.passed for outcome in self.outcomes)

    @property
    def failures(self) -> list[TestOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.passed]

    def summary(self, limit: int = 3) -> str:
        """One line per failure (or the load error), for feedback to an LLM and for critiques."""
        if self.error is not None:
            return f"the code does not run: {self.error[0]}: {self.error[1]}"
        failures = self.failures
        lines = [f"{len(failures)} of {len(self.outcomes)} tests failed:"]
        lines += [f"{f.test} -> {f.error_type}: {f.message}" for f in failures[:limit]]
        return "\n".join(lines)


def _root_entries() -> list[str]:
    """Bind or link the top-level system folders (/usr, and /bin, /lib... as links or folders)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def bwrap_command(
    bwrap: str, python_homes: Sequence[str], info_fd: int, *, privileged: bool, uid: int
) -> list[str]:
    """The bubblewrap command line in front of the interpreter; it writes the sandbox init's pid to
    `info_fd`."""
    if privileged:  # root: no user namespace; the bootstrap needs CAP_SETUID/SETGID to drop to `uid`
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
        namespaces += ["--unshare-cgroup-try", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        namespaces = ["--unshare-all", "--unshare-user", "--disable-userns"]
        namespaces += ["--uid", str(uid), "--gid", str(uid)]
    homes = []
    for home in python_homes:  # its folders made traversable (bubblewrap copies /root's 0700), then it
        for folder in reversed(Path(home).parents[:-1]):
            homes += ["--perms", "0755", "--dir", str(folder)]
        homes += ["--ro-bind", home, home]
    return [
        bwrap, *namespaces, "--die-with-parent", "--new-session", "--clearenv",
        *_root_entries(), "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", *homes,
        "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp",
        "--remount-ro", "/", "--chdir", "/tmp", "--info-fd", str(info_fd),
    ]  # fmt: skip


class Sandbox:
    """Runs Python source isolated, with limits; at most `max_concurrent` programs at a time.

    `bwrap` names bubblewrap (default: `bwrap` on PATH), `interpreter` the Python that runs programs
    (default: the daemon's own), `launch_uid` a uid to start bubblewrap as (root only; it then runs
    unprivileged, in a user namespace, as it does for a daemon that is not root)."""

    def __init__(
        self,
        *,
        max_concurrent: int = 4,
        memory_mb: int = 512,
        processes: int = 16,
        bwrap: str | None = None,
        interpreter: str | None = None,
        launch_uid: int | None = None,
    ) -> None:
        self._max_concurrent = max_concurrent
        # An asyncio.Semaphore belongs to the loop it first waits on; a sandbox outlives loops (each
        # refinement job and demo tick runs its own), so each loop gets its own slots.
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._memory = memory_mb << 20
        self._processes = processes
        self._bwrap = bwrap or shutil.which("bwrap") or "bwrap"
        self.interpreter = os.path.realpath(interpreter or sys.executable)
        self.launch_uid = launch_uid
        self._probed = False
        self._problem: str | None = None
        self._probing = threading.Lock()

    def _argv(self, info_fd: int, cpu_s: int) -> list[str]:
        privileged = os.geteuid() == 0 and self.launch_uid is None
        bwrap = bwrap_command(
            self._bwrap, self._python_homes(), info_fd, privileged=privileged, uid=SANDBOX_UID
        )
        return [
            *bwrap,
            self.interpreter, "-I", "-S", "-c", _BOOTSTRAP, str(cpu_s), str(self._memory),
            str(self._processes), str(SANDBOX_UID), str(OPEN_FILES), str(FILE_BYTES),
        ]  # fmt: skip

    def _python_homes(self) -> list[str]:
        """The interpreter's installation, bound read-only (what is under /usr is there already)."""
        homes = {str(Path(self.interpreter).parents[1])}
        if self.interpreter == os.path.realpath(sys.executable):
            homes |= {sys.base_prefix, sys.base_exec_prefix}
        return sorted(home for home in homes if home != "/usr" and not home.startswith("/usr/"))

    def _launch(self) -> dict[str, Any]:
        """Popen's options that start bubblewrap as `launch_uid`."""
        if self.launch_uid is None:
            return {}
        return {"user": self.launch_uid, "group": self.launch_uid, "extra_groups": []}

    def unavailable(self) -> str | None:
        """Why programs cannot be isolated here, or None when they can (checked once, by running one)."""
        with self._probing:
            if not self._probed:
                self._problem, self._probed = self._probe(), True
        return self._problem

    def _probe(self) -> str | None:
        if shutil.which(self._bwrap) is None:
            return f"bubblewrap ({self._bwrap}) is not installed: {INSTALL_HINT}"
        read, write = os.pipe()
        try:
            result = subprocess.run(
                self._argv(write, 5), input=_framed("print('isolated')", ""), pass_fds=(write,), env={},
                capture_output=True, timeout=60, **self._launch(),
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as error:
            return f"bubblewrap ({self._bwrap}) could not be started: {error}"
        finally:
            os.close(read)
            os.close(write)
        if result.returncode != 0 or result.stdout != b"isolated\n":
            lines = result.stderr.decode(errors="replace").strip().splitlines()
            problem = (lines or [f"exit code {result.returncode}"])[-1]
            return f"bubblewrap ({self._bwrap}) cannot isolate a program here: {problem}"
        return None

    async def run_program(self, source: str, *, stdin: str = "", timeout_s: float = 5.0) -> ProgramRun:
        problem = self._problem if self._probed else await asyncio.to_thread(self.unavailable)
        if problem is not None:
            raise SandboxUnavailable(f"programs are not run without isolation: {problem}")
        loop = asyncio.get_running_loop()
        slots = self._slots.get(loop)
        if slots is None:
            slots = self._slots[loop] = asyncio.Semaphore(self._max_concurrent)
        async with slots:
            return await self._run(source, stdin, timeout_s)

    async def _run(self, source: str, stdin: str, timeout_s: float) -> ProgramRun:
        info_read, info_write = os.pipe()
        with open(info_read, "rb") as info:
            try:
                process = await asyncio.create_subprocess_exec(
                    *self._argv(info_write, max(1, int(timeout_s) + 1)),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, env={}, pass_fds=(info_write,), start_new_session=True,
                    **self._launch(),
                )  # fmt: skip
            finally:
                os.close(info_write)
            # the output so far is kept on a timeout: the pipes close once the tree is killed
            talking = asyncio.ensure_future(process.communicate(_framed(source, stdin)))
            done, _ = await asyncio.wait({talking}, timeout=timeout_s)
            if not done:
                _kill_tree(process.pid, info)
            stdout, stderr = await talking
        return ProgramRun(
            stdout=stdout.decode(errors="replace"),
            stderr="" if not done else stderr.decode(errors="replace"),
            exit_code=process.returncode if done else None,
            timed_out=not done,
        )

    async def run_tests(self, code: str, tests: list[str], *, timeout_s: float = 5.0) -> TestReport:
        run = await self.run_program(_TEST_HARNESS, stdin=json.dumps([code, tests]), timeout_s=timeout_s)
        marker = run.stdout.rfind("\x1eRESULTS")
        if marker < 0:
            return TestReport(outcomes=[], error=run.error)
        results = json.loads(run.stdout[marker + len("\x1eRESULTS") :])
        return TestReport(
            outcomes=[
                TestOutcome(
                    test=test,
                    passed=result is None,
                    error_type=(result or ["", ""])[0],
                    message=(result or ["", ""])[1],
                )
                for test, result in zip(tests, results, strict=True)
            ]
        )


def _framed(source: str, stdin: str) -> bytes:
    """The bootstrap's stdin: the source's length, the source, then the program's own stdin."""
    code = source.encode()
    return b"%d\n" % len(code) + code + stdin.encode()


def _kill_tree(bwrap_pid: int, info: BinaryIO) -> None:
    """SIGKILL the sandbox's PID-namespace init: the kernel kills every process in the namespace before
    the init is gone, and bubblewrap exits once it is; `info` holds the init's pid (bubblewrap writes it
    once the sandbox is set up: before that, bubblewrap's death takes the init with it)."""
    os.set_blocking(info.fileno(), False)
    try:
        child = json.loads(info.read() or b"{}").get("child-pid")
    except ValueError:
        child = None
    with contextlib.suppress(ProcessLookupError):
        if child:
            os.kill(int(child), signal.SIGKILL)
        else:
            os.killpg(bwrap_pid, signal.SIGKILL)
