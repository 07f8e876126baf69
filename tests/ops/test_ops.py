"""The operator's kit in ops/: every file parses and validates, the Prometheus rules pass promtool's unit
tests, the canary queries return one value, and every metric the kit queries is one cegraph exposes.

Schemas: the Kubernetes manifest is validated against the Kubernetes JSON schemas that the
`kubernetes-validate` package ships (strict: unknown fields fail). No offline schema exists for Argo
Rollouts and Flagger resources, the Collector configuration or Grafana dashboards, so the fields that
matter are validated explicitly with the models below (for the two CRDs, argoproj.io/v1alpha1
AnalysisTemplate and flagger.app/v1beta1 MetricTemplate, the fields these files use with the CRDs' types;
any other field fails).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

import kubernetes_validate
import promql_parser
import pytest
import yaml
from collector_tier import COLLECTOR_SERIES
from conftest import IN_CI
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field
from starlette.testclient import TestClient

from cegraph.daemon.app import build
from cegraph.daemon.settings import Settings, env_name, iter_fields

OPS = Path(__file__).resolve().parents[2] / "ops"
RULES = OPS / "prometheus" / "cegraph.rules.yml"
RULE_TESTS = sorted((OPS / "prometheus" / "tests").glob("*.test.yml"))
COLLECTOR = OPS / "otel-collector" / "collector.yaml"
SIDECAR = OPS / "kubernetes" / "cegraph-sidecar.yaml"
ANALYSIS_TEMPLATE = OPS / "argo-rollouts" / "analysis-template.yaml"
METRIC_TEMPLATES = OPS / "flagger" / "metric-template.yaml"
DASHBOARD = OPS / "grafana" / "cegraph-dashboard.json"
# Series that Prometheus itself makes for every scrape target, not cegraph.
PROMETHEUS_SERIES = {"up"}


def load_yaml(path: Path) -> list[Any]:
    return list(yaml.safe_load_all(path.read_text()))


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool is missing (Debian package prometheus; `make setup` installs it as root)"
        if IN_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return found


def run_promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


# ---- every file parses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted(p for p in OPS.rglob("*") if p.suffix in {".yml", ".yaml", ".json"}),
    ids=lambda p: str(p.relative_to(OPS)),
)
def test_every_ops_file_parses(path):
    documents = [json.loads(path.read_text())] if path.suffix == ".json" else load_yaml(path)
    assert documents and all(isinstance(d, dict) for d in documents)


# ---- Prometheus rules --------------------------------------------------------------------------------


def test_promtool_check_rules():
    result = run_promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass():
    assert RULE_TESTS
    result = run_promtool("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def rules_with(key: str) -> list[dict[str, Any]]:
    """The rules that have `key` ("alert" or "record")."""
    return [rule for group in load_yaml(RULES)[0]["groups"] for rule in group["rules"] if key in rule]


def alert_names() -> set[str]:
    return {rule["alert"] for rule in rules_with("alert")}


def test_every_alert_has_a_firing_and_a_silent_unit_test():
    fired, silent = set(), set()
    for path in RULE_TESTS:
        for test in load_yaml(path)[0]["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case["exp_alerts"] else silent).add(case["alertname"])
    assert alert_names() - fired == set(), "alerts no unit test fires"
    assert alert_names() - silent == set(), "alerts no unit test keeps silent"


def test_recording_rules_follow_level_metric_operations():
    records = [rule["record"] for rule in rules_with("record")]
    assert records
    for name in records:
        level, metric, operations = name.split(":")
        assert level and operations and metric.startswith("cegraph_") and not metric.endswith("_total"), name


# ---- Argo Rollouts and Flagger ------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Metadata(Strict):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None


class PrometheusProvider(Strict):
    address: str
    query: str


class AnalysisProvider(Strict):
    prometheus: PrometheusProvider


class AnalysisMetric(Strict):
    name: str
    interval: str = Field(pattern=r"^\d+[smh]$")
    success_condition: str | None = Field(None, alias="successCondition")
    failure_condition: str | None = Field(None, alias="failureCondition")
    failure_limit: int | str | None = Field(None, alias="failureLimit")
    count: int | str | None = None
    provider: AnalysisProvider


class Argument(Strict):
    name: str
    value: str | None = None


class AnalysisTemplateSpec(Strict):
    args: list[Argument] = []
    metrics: list[AnalysisMetric] = Field(min_length=1)


class AnalysisTemplate(Strict):
    api_version: Literal["argoproj.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["AnalysisTemplate"]
    metadata: Metadata
    spec: AnalysisTemplateSpec


class FlaggerProvider(Strict):
    type: Literal["prometheus"]
    address: str


class MetricTemplateSpec(Strict):
    provider: FlaggerProvider
    query: str


class MetricTemplate(Strict):
    api_version: Literal["flagger.app/v1beta1"] = Field(alias="apiVersion")
    kind: Literal["MetricTemplate"]
    metadata: Metadata
    spec: MetricTemplateSpec


def analysis_template() -> AnalysisTemplate:
    (document,) = load_yaml(ANALYSIS_TEMPLATE)
    return AnalysisTemplate.model_validate(document)


def metric_templates() -> list[MetricTemplate]:
    return [MetricTemplate.model_validate(d) for d in load_yaml(METRIC_TEMPLATES)]


def test_analysis_template_arguments_are_declared_and_conditions_read_the_result():
    template = analysis_template()
    declared = {arg.name for arg in template.spec.args}
    text = ANALYSIS_TEMPLATE.read_text()
    assert set(re.findall(r"\{\{args\.([\w-]+)\}\}", text)) == declared
    verdict = next(
        m for m in template.spec.metrics if "cegraph_canary_verdict" in m.provider.prometheus.query
    )
    assert verdict.failure_condition == "result[0] < 0" and verdict.failure_limit == 0


def test_flagger_templates_use_only_flagger_variables():
    known = {"name", "namespace", "target", "service", "ingress", "interval"}
    for template in metric_templates():
        for variable in re.findall(r"\{\{\s*([\w.]+)\s*\}\}", template.spec.query):
            assert variable in known or variable.startswith("variables."), variable


def argo_query(query: str) -> str:
    return query.replace("{{args.workflow}}", "qa")


def flagger_query(query: str) -> str:
    return re.sub(r"\{\{\s*variables\.workflow\s*\}\}", "qa", query)


def canary_queries() -> list[Any]:
    """Every Argo and Flagger query with the workflow filled in, as (what it reads, PromQL)."""
    queries = [
        (f"argo-{m.name}", argo_query(m.provider.prometheus.query)) for m in analysis_template().spec.metrics
    ]
    queries += [(f"flagger-{t.metadata.name}", flagger_query(t.spec.query)) for t in metric_templates()]
    return [
        pytest.param("verdict" if "cegraph_canary_verdict" in query else "excess", query, id=name)
        for name, query in queries
    ]


# Replicas a and b judge workflow qa; another workflow must not leak into qa's value.
CANARY_SERIES = {
    "verdict": [
        ('cegraph_canary_verdict{instance="a", workflow="qa"}', "0x4 -1x5"),
        ('cegraph_canary_verdict{instance="b", workflow="qa"}', "0x9"),
        ('cegraph_canary_verdict{instance="a", workflow="extract"}', "1x9"),
    ],
    "excess": [
        ('cegraph_canary_failure_rate{instance="a", workflow="qa", track="canary"}', "0.25x9"),
        ('cegraph_canary_failure_rate{instance="b", workflow="qa", track="canary"}', "0.125x9"),
        ('cegraph_canary_failure_rate{instance="a", workflow="qa", track="stable"}', "0.125x9"),
        ('cegraph_canary_failure_rate{instance="a", workflow="extract", track="canary"}', "1x9"),
    ],
}
# (minute, value): before the rollback decision, after it; the excess is max(canary) - max(stable).
CANARY_EXPECTED = {"verdict": [(2, 0.0), (7, -1.0)], "excess": [(5, 0.125)]}


@pytest.mark.parametrize("kind, query", canary_queries())
def test_canary_query_returns_one_value(kind, query, tmp_path):
    """Evaluated by promtool on series from two replicas: one sample without labels, the expected value,
    and 0 when cegraph reports nothing for the workflow."""
    rules = tmp_path / "empty.rules.yml"
    rules.write_text("groups: []\n")
    cases = [
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in CANARY_SERIES[kind]],
            "promql_expr_test": [
                {"expr": query, "eval_time": f"{minute}m", "exp_samples": [{"labels": "{}", "value": value}]}
                for minute, value in CANARY_EXPECTED[kind]
            ],
        },
        {
            "interval": "1m",
            "input_series": [{"series": 'up{job="cegraph"}', "values": "1x9"}],
            "promql_expr_test": [
                {"expr": query, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 0}]}
            ],
        },
    ]
    test_file = tmp_path / "canary.test.yml"
    test_file.write_text(yaml.safe_dump({"rule_files": [rules.name], "tests": cases}))
    result = run_promtool("test", "rules", test_file.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- OTel Collector -----------------------------------------------------------------------------------


def test_collector_writes_what_cegraph_reads():
    (config,) = load_yaml(COLLECTOR)
    defaults = Settings.model_construct()
    kafka = config["exporters"]["kafka"]
    assert kafka["partition_traces_by_id"] is True
    assert kafka["traces"]["topic"] == defaults.kafka.spans_topic
    assert kafka["traces"]["encoding"] == defaults.ingest.encoding == "otlp_proto"
    assert kafka["producer"].get("compression", "none") == "none"
    assert kafka["logs"]["topic"] == "otlp_logs" and kafka["logs"]["encoding"] == "otlp_proto"
    assert kafka["partition_logs_by_trace_id"] is True  # a trace's logs on its spans' partition number
    for signal in ("traces", "logs"):
        pipeline = config["service"]["pipelines"][signal]
        assert "kafka" in pipeline["exporters"]
        for stage in ("receivers", "processors", "exporters"):
            assert set(pipeline[stage]) <= set(config[stage]), f"{stage} used but not defined"


# ---- Kubernetes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.25.0", kubernetes_validate.latest_version()])
def test_sidecar_manifest_validates_against_the_kubernetes_schema(version):
    for document in load_yaml(SIDECAR):
        kubernetes_validate.validate(document, version, strict=True)


def cegraph_container() -> dict[str, Any]:
    deployment = next(d for d in load_yaml(SIDECAR) if d["kind"] == "Deployment")
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "cegraph")


def test_sidecar_settings_are_cegraph_settings(tmp_path, monkeypatch):
    """Every CEGRAPH_* variable is a known setting and the values validate (secrets and the store
    folder stand in for what the cluster provides)."""
    known = {env_name(path) for path, _ in iter_fields()}
    env = {e["name"]: e.get("value", "secret-from-the-cluster") for e in cegraph_container()["env"]}
    assert {name for name in env if name.startswith("CEGRAPH_")} <= known
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CEGRAPH_STORE__PATH", str(tmp_path / Path(env["CEGRAPH_STORE__PATH"]).name))
    settings = Settings(_env_file=None)
    assert settings.http.host == "0.0.0.0"


def test_sidecar_probes_and_volume_match_cegraph():
    container = cegraph_container()
    port = next(p for p in container["ports"] if p["name"] == "cegraph-http")["containerPort"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["CEGRAPH_HTTP__PORT"]) == port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "cegraph-http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "cegraph-http"}
    store_folder = str(Path(env["CEGRAPH_STORE__PATH"]).parent)
    assert store_folder in {m["mountPath"] for m in container["volumeMounts"]}
    assert {"requests", "limits"} <= set(container["resources"])


# ---- Grafana ------------------------------------------------------------------------------------------


class GridPos(Strict):
    h: int = Field(gt=0)
    w: int = Field(gt=0, le=24)
    x: int = Field(ge=0, lt=24)
    y: int = Field(ge=0)


class Target(BaseModel):
    ref_id: str = Field(alias="refId")
    expr: str


class Panel(BaseModel):
    id: int
    type: Literal["row", "timeseries", "stat", "gauge", "table", "bargauge"]
    title: str
    grid_pos: GridPos = Field(alias="gridPos")
    datasource: dict[str, str] | None = None
    targets: list[Target] = []


class Dashboard(BaseModel):
    uid: str = Field(max_length=40)
    title: str
    schema_version: int = Field(alias="schemaVersion", ge=36)
    panels: list[Panel]
    templating: dict[str, list[dict[str, Any]]]


def dashboard() -> Dashboard:
    return Dashboard.model_validate_json(DASHBOARD.read_text())


def test_dashboard_panels_are_well_formed():
    board = dashboard()
    assert len({p.id for p in board.panels}) == len(board.panels)
    variables = {v["name"] for v in board.templating["list"]}
    for panel in board.panels:
        assert panel.grid_pos.x + panel.grid_pos.w <= 24, panel.title
        if panel.type == "row":
            continue
        assert panel.targets, panel.title
        assert len({t.ref_id for t in panel.targets}) == len(panel.targets), panel.title
        assert panel.datasource == {"type": "prometheus", "uid": "${datasource}"}, panel.title
        for target in panel.targets:
            used = set(re.findall(r"\$(?!__)(\w+)", target.expr)) | set(re.findall(r"\$\{(\w+)", target.expr))
            assert used <= variables, (panel.title, used - variables)


def test_dashboard_shows_what_operators_watch():
    queries = " ".join(t.expr for p in dashboard().panels for t in p.targets)
    for metric in (
        "cegraph_failure_mass",
        "cegraph_expected_failure_mass",
        "cegraph_modes",
        "cegraph_ingest_messages_total",
        "cegraph_dead_letters_total",
        "cegraph_consumer_lag",
        "cegraph_refinement_jobs_running",
        "cegraph_patches_published_total",
        "cegraph_canary_verdict",
    ):
        assert metric in queries, metric


# ---- every metric queried is one cegraph exposes ------------------------------------------------------


def metric_families(store: Path) -> list[Metric]:
    """The metric families cegraph's /metrics serves, from the app that `cegraph run` builds (not
    started: no Kafka needed)."""
    client = TestClient(build(Settings(_env_file=None, store={"path": store})))
    response = client.get("/metrics")
    assert response.status_code == 200
    return list(text_string_to_metric_families(response.text))


def exposed_metric_names(store: Path) -> set[str]:
    """Sample names that cegraph's /metrics serves. A labelled metric has no samples until first used,
    so names come from its type."""
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in metric_families(store):
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def selector_names(promql: str) -> set[str]:
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(promql), visit)
    return names


def grafana_query(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m")


def queried_metric_names() -> dict[str, set[str]]:
    """Metric names per file: rules, their unit tests' input series, Argo, Flagger, the dashboard."""
    used = {RULES.name: set().union(*(selector_names(r["expr"]) for r in rules_with("expr")))}
    for path in RULE_TESTS:
        tests = load_yaml(path)[0]["tests"]
        used[path.name] = set().union(
            *(selector_names(s["series"]) for t in tests for s in t["input_series"]),
            *(selector_names(c["expr"]) for t in tests for c in t.get("promql_expr_test", [])),
        )
    used[ANALYSIS_TEMPLATE.name] = set().union(
        *(selector_names(argo_query(m.provider.prometheus.query)) for m in analysis_template().spec.metrics)
    )
    used[METRIC_TEMPLATES.name] = set().union(
        *(selector_names(flagger_query(t.spec.query)) for t in metric_templates())
    )
    board = dashboard()
    variable_queries = [v["definition"] for v in board.templating["list"] if "definition" in v]
    used[DASHBOARD.name] = set().union(
        *(selector_names(grafana_query(t.expr)) for p in board.panels for t in p.targets),
        *({m} for q in variable_queries for m in re.findall(r"label_values\((\w+)", q)),
    )
    return used


def test_every_queried_metric_is_exposed_by_cegraph(tmp_path):
    recorded = {rule["record"] for rule in rules_with("record")}
    known = (
        exposed_metric_names(tmp_path / "cegraph.duckdb") | recorded | PROMETHEUS_SERIES | COLLECTOR_SERIES
    )
    unknown = {f: sorted(names - known) for f, names in queried_metric_names().items() if names - known}
    assert not unknown, f"metrics queried in ops/ that cegraph's /metrics does not serve: {unknown}"


def test_the_name_check_sees_an_unknown_metric(tmp_path):
    known = exposed_metric_names(tmp_path / "cegraph.duckdb")
    assert "cegraph_dead_letters_total" in known and "cegraph_store_commit_seconds_bucket" in known
    assert selector_names('rate(cegraph_dead_letterz_total{topic="x"}[5m])') - known == {
        "cegraph_dead_letterz_total"
    }


def test_the_operating_page_names_every_cegraph_metric_and_no_other(tmp_path):
    """docs/operating.md lists the metrics: one added or renamed in code must be named there too."""
    families = [f for f in metric_families(tmp_path / "cegraph.duckdb") if f.name.startswith("cegraph_")]
    names = {family.name for family in families}
    # the text format's `_created` samples of a counter or histogram parse as families of their own
    served = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in families
        if not (family.name.endswith("_created") and family.name.removesuffix("_created") in names)
    }
    page = (OPS.parent / "docs" / "operating.md").read_text()
    section = page.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\bcegraph_[a-z_]*[a-z]", section))
    assert not served - named, f"served, but not in docs/operating.md: {sorted(served - named)}"
    assert not named - served, f"in docs/operating.md, but not served: {sorted(named - served)}"
