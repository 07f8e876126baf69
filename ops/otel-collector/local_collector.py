"""A real OpenTelemetry Collector built from `manifest.yaml` beside this file, for tests and local use.

The Collector Builder (OCB) and the Go module proxy compile it once into a cache outside the repository
(`$CEGRAPH_OTELCOL_CACHE`, default `~/.cache/cegraph/otelcol/<digest of the manifest and builder>/`),
reused by every later run and clone. A build takes minutes and most of a GiB: it runs niced, with at most
`$CEGRAPH_OTELCOL_BUILD_JOBS` (default 2) compile jobs, since the machine is shared.

A Collector started by a Python process gets free 127.0.0.1 ports, a fresh folder for its config and
log, dies with that process even when it is killed (Linux `PR_SET_PDEATHSIG`), and is ready only once
it logged that every pipeline runs and its OTLP/HTTP receiver accepted an (empty) export.

    python ops/otel-collector/local_collector.py build      # prints the binary's path
    python ops/otel-collector/local_collector.py validate CONFIG
"""

from __future__ import annotations

import argparse
import hashlib
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
from local_service import LocalProcess, die_with_parent, free_port  # noqa: E402

MANIFEST = HERE / "manifest.yaml"
BUILDER = "go.opentelemetry.io/collector/cmd/builder@v0.165.0"
BINARY_NAME = "otelcol-cegraph"
READY_LINE = "Everything is ready. Begin running and processing data."


class CollectorError(RuntimeError):
    """The Collector could not be built or started; the message says why and where its log is."""


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "cegraph" / "otelcol"
    return Path(os.environ.get("CEGRAPH_OTELCOL_CACHE", default))


def build_digest() -> str:
    """What defines the build: the manifest's content (not its comments) and the builder's version."""
    lines = [
        line
        for line in MANIFEST.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return hashlib.sha256("\n".join([*lines, BUILDER]).encode()).hexdigest()[:16]


def binary_path() -> Path:
    return cache_dir() / build_digest() / BINARY_NAME


def _build_env(gobin: Path) -> dict[str, str]:
    jobs = os.environ.get("CEGRAPH_OTELCOL_BUILD_JOBS", "2")
    env = dict(os.environ)
    env.update(
        GOBIN=str(gobin),
        GOMAXPROCS=jobs,
        GOFLAGS=f"-p={jobs} -buildvcs=false",
        CGO_ENABLED="0",
        GOTOOLCHAIN="local",
    )
    return env


def _run(command: list[str], env: dict[str, str], log: Path) -> None:
    with log.open("ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
        out.flush()
        result = subprocess.run(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10)
        )
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise CollectorError(f"`{command[0]}` failed (exit {result.returncode}); log {log}:\n{tail}")


def ensure_binary() -> Path:
    """The Collector binary for the manifest, building it the first time (minutes)."""
    target = binary_path()
    if target.exists():
        return target
    if shutil.which("go") is None:
        raise CollectorError("building the Collector needs Go (`go` on PATH, 1.24 or newer)")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    log = staging / "build.log"
    env = _build_env(staging / "bin")
    print(f"local_collector: building the Collector into {target.parent} (once; minutes)", file=sys.stderr)
    try:
        _run(["go", "install", BUILDER], env, log)
        _run(
            [str(staging / "bin" / "builder"), f"--config={MANIFEST}", f"--output-path={staging / 'dist'}"],
            env,
            log,
        )
        built = staging / "dist" / BINARY_NAME
        if not built.exists():
            raise CollectorError(f"the builder finished without {built}; log {log}")
        final = root / build_digest()
        final.mkdir(exist_ok=True)
        shutil.copy2(log, final / "build.log")
        partial = final / f".{BINARY_NAME}.{os.getpid()}"
        shutil.copy2(built, partial)
        partial.rename(target)  # atomic: a concurrent build leaves one complete binary
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def validate(config: Path) -> None:
    result = subprocess.run(
        [str(ensure_binary()), "validate", f"--config={config}"], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise CollectorError(f"{config} does not validate:\n{result.stdout}{result.stderr}")


class LocalCollector(LocalProcess):
    """One Collector process running the config text given; `start()` returns its OTLP/gRPC endpoint
    once it is healthy.

    The config may use `${env:VAR}` placeholders; `start()` sets `OTLP_GRPC_ENDPOINT` and
    `OTLP_HTTP_ENDPOINT` to free 127.0.0.1 addresses and `TELEMETRY_PORT` (the Collector's own
    Prometheus metrics) to a free port, with any extra variables given.
    """

    name = "the Collector"
    start_error = CollectorError

    def __init__(
        self, config_text: str, *, env: dict[str, str] | None = None, startup_timeout_s: float = 60.0
    ):
        self.config_text = config_text
        self.extra_env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.grpc_endpoint = ""
        self.http_endpoint = ""
        self.telemetry_port = 0

    def start(self) -> str:
        binary = ensure_binary()
        self.workdir = Path(tempfile.mkdtemp(prefix="cegraph-otelcol-"))
        config = self.workdir / "collector.yaml"
        config.write_text(self.config_text)
        self.grpc_endpoint = f"127.0.0.1:{free_port()}"
        self.http_endpoint = f"127.0.0.1:{free_port()}"
        self.telemetry_port = free_port()
        env = dict(os.environ)
        env.update(
            OTLP_GRPC_ENDPOINT=self.grpc_endpoint,
            OTLP_HTTP_ENDPOINT=self.http_endpoint,
            TELEMETRY_PORT=str(self.telemetry_port),
            **self.extra_env,
        )
        with (self.workdir / "collector.log").open("ab") as log:
            self.process = subprocess.Popen(
                [str(binary), f"--config={config}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=die_with_parent,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self.grpc_endpoint

    def _wait_ready(self) -> None:
        """Ready is the log's ready line and then an (empty) OTLP/HTTP export answered 200."""

        def answers() -> bool:
            if READY_LINE not in self.log_text():
                return False
            empty_export = urllib.request.Request(
                f"http://{self.http_endpoint}/v1/traces",
                data=b"",
                headers={"Content-Type": "application/x-protobuf"},
            )
            with urllib.request.urlopen(empty_export, timeout=5) as response:
                return response.status == 200

        self.wait_ready(
            answers, retry_on=(urllib.error.URLError, OSError), unanswered="was not ready", interval_s=0.2
        )

    def metrics_text(self) -> str:
        """The Collector's own metrics (Prometheus text): what it received, sent and failed to send."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.telemetry_port}/metrics", timeout=10
        ) as response:
            return response.read().decode()

    def log_text(self) -> str:
        if self.workdir is None or not (self.workdir / "collector.log").exists():
            return ""
        return (self.workdir / "collector.log").read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the Collector into the cache (or reuse it) and print its path")
    check = sub.add_parser("validate", help="check a Collector config with the built binary")
    check.add_argument("config", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(ensure_binary())
        else:
            validate(args.config)
            print(f"local_collector: {args.config} is valid", file=sys.stderr)
        return 0
    except CollectorError as error:
        print(f"local_collector: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
