"""Shared fixtures; above all `kafka_bootstrap`, the real broker every Kafka test talks to, and
`start_collector`, the real OpenTelemetry Collector in front of it, and `llm_server`
(tests/fixtures/llm_server.py), the real model every real-model test talks to.

Which broker, in order: `KAFKA_BOOTSTRAP_SERVERS` if set; a testcontainers Kafka when a Docker engine
really answers; otherwise Apache Kafka started from its Maven Central jars (ops/kafka/local_kafka.py).
The Collector is the one `make collector` builds from ops/otel-collector/manifest.yaml (built here if
the cache lacks it). Under `CI=true` a Kafka or Collector test fails when its service can't be had;
elsewhere it is skipped with the reason. Under pytest-xdist the broker and the model server are
started once, by the controller, for all workers (tests/fixtures/shared_services.py).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import shared_services
from llm_server import SERVERS_USED, llm_server, start_llm  # noqa: F401 (a fixture for every test module)
from needs import IN_CI, Unavailable, needed, unavailable

BROKERS_USED: list[str] = []


@dataclass(frozen=True)
class KafkaBroker:
    bootstrap_servers: str
    kind: str  # "external", "testcontainers" or "apache-kafka-local"


def docker_engine_answers() -> bool:
    """The docker CLI may be installed with no engine behind it: ask the engine itself."""
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def start_kafka(cleanup: Callable[[Callable[[], object]], None]) -> KafkaBroker:
    """The broker of this run (module docstring for which); `cleanup` takes what stops it. Raises
    `Unavailable` when none can be had."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        BROKERS_USED.append(f"external Kafka at {external} (KAFKA_BOOTSTRAP_SERVERS)")
        return KafkaBroker(external, "external")
    if docker_engine_answers():
        from testcontainers.kafka import KafkaContainer

        container = KafkaContainer().with_kraft()
        try:
            container.start()
        except Exception as error:
            raise Unavailable("Kafka broker", f"testcontainers Kafka did not start: {error}") from error
        cleanup(container.stop)
        BROKERS_USED.append(f"testcontainers Kafka at {container.get_bootstrap_server()}")
        return KafkaBroker(container.get_bootstrap_server(), "testcontainers")
    from local_kafka import KafkaStartError, LocalKafka

    broker = LocalKafka()
    for attempt in (1, 2):  # a second try on fresh ports: a free port can be taken before the JVM binds it
        try:
            broker.start()
            break
        except KafkaStartError as error:
            if attempt == 2:
                raise Unavailable("Kafka broker", f"the local Apache Kafka did not start: {error}") from error
    cleanup(broker.stop)
    assert broker.process is not None
    BROKERS_USED.append(
        f"Apache Kafka started for the run (KRaft, pid {broker.process.pid}) at {broker.bootstrap_servers}"
    )
    return KafkaBroker(broker.bootstrap_servers, "apache-kafka-local")


@pytest.fixture(scope="session")
def kafka_broker(request: pytest.FixtureRequest) -> KafkaBroker:
    return shared_services.use("kafka", KafkaBroker) or needed(lambda: start_kafka(request.addfinalizer))


def pytest_configure(config: pytest.Config) -> None:
    if shared_services.is_controller(config):
        shared_services.start(
            {"kafka": lambda: start_kafka(config.add_cleanup), "llm": lambda: start_llm(config.add_cleanup)}
        )


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    return kafka_broker.bootstrap_servers


COLLECTORS_USED: list[str] = []


def _collector_unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"no OpenTelemetry Collector under CI=true: {reason}", pytrace=False)
    pytest.skip(f"no OpenTelemetry Collector: {reason}")


@pytest.fixture(scope="session")
def collector_binary() -> Path:
    """The Collector binary, built into the cache the first time (minutes)."""
    from local_collector import CollectorError, ensure_binary

    try:
        binary = ensure_binary()
    except CollectorError as error:
        _collector_unavailable(f"it could not be built: {error}")
    COLLECTORS_USED.append(str(binary))
    return binary


@pytest.fixture
def start_collector(collector_binary: Path) -> Iterator[Callable[..., object]]:
    """`start_collector(config_text, **env)`: a running Collector (`LocalCollector`), stopped by PID
    when the test ends; on a failed start the test fails (CI) or skips with the Collector's log."""
    from local_collector import CollectorError, LocalCollector

    started: list[LocalCollector] = []

    def start(config_text: str, **env: str) -> LocalCollector:
        collector = LocalCollector(config_text, env=env)
        for attempt in (1, 2):  # fresh ports on a second try: a free port can be taken before it binds
            try:
                collector.start()
                break
            except CollectorError as error:
                if attempt == 2:
                    _collector_unavailable(f"it did not start: {error}")
        started.append(collector)
        return collector

    yield start
    for collector in started:
        collector.stop()


TRAIL_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "trail-gaia.tar.gz"


@pytest.fixture(scope="session")
def trail_dataset() -> Path:
    """The TRAIL GAIA split from ../shared/datasets; required under CI."""
    if not TRAIL_DATASET.exists():
        unavailable("TRAIL dataset", f"not found at {TRAIL_DATASET}")
    return TRAIL_DATASET


@pytest.fixture
def topic_name() -> str:
    """A fresh topic per test, so tests never read each other's messages."""
    return f"test-{uuid.uuid4().hex[:12]}"


def _minutes(item: pytest.Item) -> float:
    marker = item.get_closest_marker("long")
    return float(marker.kwargs.get("minutes", 1)) if marker else 0.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark what needs a service; put the files marked `long` first, longest first, so that with
    `--dist loadfile --no-loadscope-reorder` (files handed out in collection order, not by how many
    tests they hold, which left the one-test demo files to the end) they start at once and overlap
    the rest of the run instead of making its tail. The same order on every worker: xdist requires it."""
    longest = {}
    for item in items:
        longest[item.path] = max(longest.get(item.path, 0.0), _minutes(item))
    items.sort(key=lambda item: -longest[item.path])  # stable: collection order otherwise
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "kafka_bootstrap" in fixtures or "kafka_broker" in fixtures:
            item.add_marker(pytest.mark.kafka)
        if "collector_binary" in fixtures:
            item.add_marker(pytest.mark.collector)
        if "llm_server" in fixtures:
            item.add_marker(pytest.mark.llm)


def pytest_report_header() -> list[str]:
    must = "must run" if IN_CI else "may skip"
    return [f"cegraph: CI={'true' if IN_CI else 'false'} (Kafka, Collector and real-model tests {must})"]


def pytest_terminal_summary(terminalreporter) -> None:
    for line in BROKERS_USED:
        terminalreporter.write_line(f"kafka: tests ran against {line}")
    for line in COLLECTORS_USED:
        terminalreporter.write_line(f"collector: tests ran the OpenTelemetry Collector {line}")
    for line in SERVERS_USED:
        terminalreporter.write_line(f"llm: tests ran against {line}")
