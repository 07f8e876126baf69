"""The sandbox against the escapes an LLM-written program would try: the daemon's secrets (its environment,
`/proc/<ppid>/environ`), the network (a listening loopback port, as Kafka is), the host's files, children
that outlive their run, a fork bomb, memory. Each attempt must fail; the program's own work must not.

These tests need the isolation the sandbox is built on (bubblewrap, `make setup` installs it as root):
without it they skip, and under CI=true they fail.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from conftest import IN_CI

from cegraph.daemon.workflows.sandbox import SANDBOX_UID, Sandbox, SandboxUnavailable

SYSTEM_PYTHON = "/usr/bin/python3"


def _sandbox(kind: str) -> Sandbox:
    if kind == "unprivileged":
        # what a daemon that is not root gets: bubblewrap started as an ordinary uid, in a user
        # namespace (here with the system's Python, which that uid can read)
        if os.geteuid() != 0:
            pytest.skip("the daemon is not root: the default sandbox is already the unprivileged one")
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            pytest.skip(f"no {SYSTEM_PYTHON} to run as an unprivileged uid")
        return Sandbox(interpreter=SYSTEM_PYTHON, launch_uid=SANDBOX_UID)
    return Sandbox()


@pytest.fixture(scope="module", params=["daemon", "unprivileged"])
def sandbox(request) -> Sandbox:
    sandbox = _sandbox(request.param)
    problem = sandbox.unavailable()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"no sandbox isolation under CI=true: {problem}", pytrace=False)
        pytest.skip(f"no sandbox isolation: {problem}")
    return sandbox


def run(sandbox: Sandbox, source: str, **options):
    return asyncio.run(sandbox.run_program(source, **options))


# A daemon in a process of its own, its secret in its environment from the start (as `cegraph run`
# gets CEGRAPH_PUBLISHER__SIGNING_KEY): it runs the program from stdin and prints what it printed.
DAEMON = """
import asyncio, sys
from cegraph.daemon.workflows.sandbox import Sandbox
run = asyncio.run(Sandbox(**eval(sys.argv[1])).run_program(sys.stdin.read()))
print(run.stdout, run.stderr)
"""


def test_a_program_sees_none_of_the_daemons_secrets(sandbox):
    secret = f"signing-key-{uuid.uuid4().hex}"
    probe = """
import os
print(dict(os.environ))
for pid in {os.getppid(), 1, *(p for p in os.listdir("/proc") if p.isdigit())}:
    for name in ("environ", "cmdline"):
        try:
            print(pid, name, open(f"/proc/{pid}/{name}", "rb").read())
        except OSError as error:
            print(pid, name, "refused:", error)
"""
    options = {"interpreter": sandbox.interpreter, "launch_uid": sandbox.launch_uid}
    daemon = subprocess.run(
        [sys.executable, "-c", DAEMON, repr(options)],
        input=probe,
        env={**os.environ, "CEGRAPH_PUBLISHER__SIGNING_KEY": secret},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert daemon.returncode == 0, daemon.stderr
    assert "environ" in daemon.stdout, daemon.stdout  # the probe ran
    assert secret not in daemon.stdout and "CEGRAPH" not in daemon.stdout


def test_a_program_cannot_reach_a_listening_loopback_port(sandbox):
    accepted: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                try:
                    accepted.append(server.accept()[0])
                except TimeoutError:
                    continue

        listener = threading.Thread(target=accept)
        listener.start()
        try:
            result = run(
                sandbox,
                f"""
import socket
for family, address in ((socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_INET6, ("::1", {port}))):
    try:
        socket.create_connection(address, timeout=2).close()
        print("connected", address)
    except OSError as error:
        print("refused", type(error).__name__)
""",
            )
        finally:
            stop.set()
            listener.join()
    for connection in accepted:
        connection.close()
    assert result.ok, result.stderr
    assert "connected" not in result.stdout and result.stdout.count("refused") == 2
    assert accepted == []


def test_a_program_writes_only_in_its_own_private_folder(sandbox, tmp_path):
    outside = [tmp_path / "escaped.txt", Path("/tmp") / f"cegraph-escape-{uuid.uuid4().hex}"]
    source = f"""
import os
for path in {[str(p) for p in outside]!r} + ["/usr/escaped", "/escaped"]:
    try:
        with open(path, "w") as handle:
            handle.write("out")
        print("wrote", path)
    except OSError as error:
        print("refused", path, type(error).__name__)
with open("note.txt", "w") as handle:
    handle.write("mine")
print("own", open("note.txt").read(), os.getcwd())
"""
    result = run(sandbox, source)
    assert result.ok, result.stderr
    assert "own mine" in result.stdout
    assert "refused /usr/escaped" in result.stdout and "refused /escaped" in result.stdout
    assert not any(path.exists() for path in outside)  # /tmp inside is the program's own
    # and the next run starts with an empty folder of its own
    again = run(sandbox, "import os; print(sorted(os.listdir('.')))")
    assert again.stdout.strip() == "[]"


def test_a_program_runs_unprivileged(sandbox):
    result = run(
        sandbox,
        "import os\nprint(os.getuid(), os.geteuid())\n"
        "print([l for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'NoNewPrivs'))])",
    )
    assert result.ok, result.stderr
    uid, euid = result.stdout.splitlines()[0].split()
    assert uid != "0" and euid != "0"
    assert "CapEff:\\t0000000000000000" in result.stdout and "CapPrm:\\t0000000000000000" in result.stdout
    assert "NoNewPrivs:\\t1" in result.stdout  # no setuid binary or file capability gives any back


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("ending", ["timeout", "exit"])
def test_no_child_outlives_its_program(sandbox, ending):
    marker = f"cegraph-orphan-{uuid.uuid4().hex}"
    source = f"""
import os, sys, time
for _ in range(3):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", "{marker}"])
        os._exit(0)
time.sleep(0.5)
print("spawned", flush=True)
{"time.sleep(120)" if ending == "timeout" else ""}
"""
    result = run(sandbox, source, timeout_s=3.0 if ending == "timeout" else 10.0)
    assert "spawned" in result.stdout, result.stderr
    assert result.timed_out == (ending == "timeout")
    assert _processes_with(marker) == []


def test_a_fork_bomb_hits_the_process_limit(sandbox):
    result = run(
        sandbox,
        """
import os, time
children = 0
try:
    for _ in range(500):
        if os.fork() == 0:
            time.sleep(20)
            os._exit(0)
        children += 1
except OSError as error:
    print("refused after", children, type(error).__name__)
else:
    print("forked", children)
""",
        timeout_s=10.0,
    )
    assert "refused after" in result.stdout, (result.stdout, result.stderr)
    assert int(result.stdout.split()[2]) < 64


def test_memory_beyond_the_limit_fails_in_the_program(sandbox):
    result = run(sandbox, "block = bytearray(2 << 30)\nprint(len(block))")
    assert not result.ok and result.error[0] == "MemoryError"


def test_the_program_gets_its_stdin_and_the_limits_leave_ordinary_work_alone(sandbox):
    source = "import json, sys\ndata = json.load(sys.stdin)\nprint(sum(x * x for x in range(data['n'])))"
    result = run(sandbox, source, stdin='{"n": 100000}')
    assert result.ok and result.stdout.strip() == str(sum(x * x for x in range(100_000)))
    long = "# " + "x" * 300_000 + "\n" + source  # longer than one command-line argument may be
    assert run(sandbox, long, stdin='{"n": 3}').stdout == "5\n"


async def test_without_isolation_programs_are_refused_not_run_unisolated(tmp_path):
    bare = Sandbox(bwrap=str(tmp_path / "no-bwrap"))
    assert "bubblewrap" in (bare.unavailable() or "")
    marker = tmp_path / "ran"
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        await bare.run_program(f"open({str(marker)!r}, 'w').write('ran')")
    with pytest.raises(SandboxUnavailable):
        await bare.run_tests("def f(): return 1", ["assert f() == 1"])
    assert not marker.exists()


async def test_without_isolation_the_runtime_refuses_specs_that_run_programs(tmp_path):
    from opentelemetry.sdk.trace import TracerProvider
    from test_runtime import ROUTED

    from cegraph.daemon.sim import SimWorld
    from cegraph.daemon.workflows.runtime import WorkflowRuntime
    from cegraph.schemas.workflow import WorkflowSpecError, example_spec, parse_spec

    runtime = WorkflowRuntime(
        SimWorld(0).llm(), TracerProvider(), sandbox=Sandbox(bwrap=str(tmp_path / "no"))
    )
    with pytest.raises(WorkflowSpecError) as refused:
        await runtime.execute(parse_spec(ROUTED), {"question": "call 555 0199"}, seed=1)
    assert "node 'count' (code) runs programs" in str(refused.value) and "bubblewrap" in str(refused.value)
    # a spec without programs still runs
    result = await runtime.execute(example_spec("arithmetic"), {"question": "What is 2 + 3?"}, seed=1)
    assert result.nodes
