"""A real single-node Apache Kafka broker (KRaft) from its Maven Central jars, for tests and local use.

No Docker needed: the jars named in `pom.xml` beside this file are gathered once by Maven into a
cache outside the repository (`$CEGRAPH_KAFKA_CACHE`, default `~/.cache/cegraph/kafka`), reused by every
later run. Each broker gets a fresh temporary folder, free 127.0.0.1 ports and a bounded heap, and is
ready only when it answers a metadata request.

A broker started by a Python process dies with that process, even when the process is killed
(Linux `PR_SET_PDEATHSIG`, ops/local_service.py), so tests can't leave a JVM behind. `up --detach` is
the exception, for manual use: it writes a state file that `down` reads to stop the broker by PID.

    python ops/kafka/local_kafka.py up [--detach]   # prints the bootstrap address
    python ops/kafka/local_kafka.py down
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # ops/: what the local services share

from local_service import (  # noqa: E402
    LocalProcess,
    alive,
    die_with_parent,
    free_port,
    run_down,
    run_up,
    stop_pid,
)

POM = HERE / "pom.xml"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1"
HEAP = os.environ.get("CEGRAPH_KAFKA_HEAP", "512m")
STATE_FILE = Path(os.environ.get("CEGRAPH_KAFKA_STATE", Path(tempfile.gettempdir()) / "cegraph-kafka.json"))

LOG4J = """\
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
"""


class KafkaStartError(RuntimeError):
    """The local broker could not be started; the message says why and where its log is."""


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "cegraph" / "kafka"
    return Path(os.environ.get("CEGRAPH_KAFKA_CACHE", default))


def ensure_jars() -> Path:
    """The folder of jars for the pinned broker, downloading them with Maven the first time."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
    target = cache_dir() / digest
    if (target / ".complete").exists():
        return target
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise KafkaStartError("the local Kafka broker needs `java` (17+) and `mvn` on PATH")
    staging = Path(tempfile.mkdtemp(prefix="jars-", dir=target.parent if target.parent.exists() else None))
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(POM),
        f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={staging}",
    ]
    print(f"local_kafka: gathering the Kafka jars into {target} (once)", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise KafkaStartError(f"mvn could not gather the Kafka jars:\n{result.stdout[-3000:]}{result.stderr}")
    (staging / ".complete").write_text(digest)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return target


def random_cluster_id() -> str:
    """Kafka's Uuid.toString: URL-safe base64 of 16 random bytes, without padding. Like Kafka's own
    `Uuid.randomUuid`, never one that starts with "-": the storage tool would read it as an option."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class LocalKafka(LocalProcess):
    """One broker+controller process; `start()` returns once it answers metadata requests."""

    name = "the broker"
    start_error = KafkaStartError

    def __init__(self, *, detach: bool = False, startup_timeout_s: float = 90.0) -> None:
        self.detach = detach
        self.startup_timeout_s = startup_timeout_s
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.bootstrap_servers = ""

    def start(self) -> str:
        jars = ensure_jars()
        sweep_stale_workdirs()
        self.workdir = Path(tempfile.mkdtemp(prefix="cegraph-kafka-"))
        self.port, controller_port = free_port(), free_port()
        self.bootstrap_servers = f"127.0.0.1:{self.port}"
        properties = self.workdir / "server.properties"
        properties.write_text(self._server_properties(controller_port))
        (self.workdir / "log4j.properties").write_text(LOG4J.format(log=self.workdir / "server.log"))
        cluster_id = random_cluster_id()
        fmt = subprocess.run(
            [*self._java(jars), "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(properties)],
            capture_output=True,
            text=True,
        )
        if fmt.returncode != 0:
            raise KafkaStartError(f"formatting KRaft storage failed:\n{fmt.stdout}{fmt.stderr}")
        self._launch(jars)
        return self.bootstrap_servers

    def restart(self) -> None:
        """Stop the broker and start it again on the same ports and data (a broker outage)."""
        assert self.workdir is not None, "start() first"
        if self.process is not None and self.process.poll() is None:
            stop_pid(self.process.pid)
            self.process.wait(timeout=30)
        self._launch(ensure_jars())

    def _java(self, jars: Path) -> list[str]:
        assert self.workdir is not None
        return [
            "java",
            f"-Xmx{HEAP}",
            f"-Xms{HEAP}",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.workdir / 'log4j.properties'}",
            "-cp",
            f"{jars}/*",
        ]

    def _launch(self, jars: Path) -> None:
        assert self.workdir is not None
        with (self.workdir / "stdout.log").open("ab") as stdout:
            self.process = subprocess.Popen(
                [*self._java(jars), "kafka.Kafka", str(self.workdir / "server.properties")],
                stdout=stdout,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=None if self.detach else die_with_parent,
                start_new_session=self.detach,
            )
        (self.workdir / "broker.pid").write_text(str(self.process.pid))
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_logs=True)
            raise

    def _server_properties(self, controller_port: int) -> str:
        assert self.workdir is not None
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"log.dirs={self.workdir / 'data'}",
                "num.partitions=1",
                "auto.create.topics.enable=true",
                "offsets.topic.num.partitions=1",
                "offsets.topic.replication.factor=1",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "group.min.session.timeout.ms=1000",
                "log.flush.interval.messages=1000000",
                "",
            ]
        )

    def _wait_ready(self) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaConfigurationError, KafkaError

        def answers() -> bool:
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=3000)
            except KafkaConfigurationError as error:  # no broker will fix a bad client config
                raise KafkaStartError(str(error)) from error
            try:
                return bool(admin.describe_cluster().get("brokers"))
            finally:
                admin.close()

        self.wait_ready(
            answers, retry_on=(KafkaError, OSError), unanswered="did not answer a metadata request"
        )

    def log_tail(self, lines: int = 40) -> str:
        if self.workdir is None:
            return ""
        text = ""
        for name in ("stdout.log", "server.log"):
            path = self.workdir / name
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text


def sweep_stale_workdirs() -> None:
    """Remove the folders of brokers that died with a killed parent (their JVM is gone, the files stay)."""
    for folder in Path(tempfile.gettempdir()).glob("cegraph-kafka-*"):
        pid_file = folder / "broker.pid"
        if pid_file.exists() and not alive(int(pid_file.read_text() or 0)):
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a broker and print its bootstrap address")
    up.add_argument("--detach", action="store_true", help="leave it running; `down` stops it")
    sub.add_parser("down", help="stop the broker that `up --detach` started")
    sub.add_parser("jars", help="only gather the jars into the cache")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            return run_up(LocalKafka(detach=args.detach), STATE_FILE, detach=args.detach, tool="local_kafka",
                      down="make kafka-down")  # fmt: skip
        if args.command == "down":
            return run_down(STATE_FILE, tool="local_kafka", name="the broker")
        print(ensure_jars())
        return 0
    except KafkaStartError as error:
        print(f"local_kafka: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
