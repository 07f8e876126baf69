"""`cegraph eval-modes` on any annotated set: TRAIL-GAIA (deterministic, beats span names), another
TRAIL-layout split found by its folder, a plain-format set with categories of its own, and one-line
errors (never a traceback) for sets that cannot be scored."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import orjson
import pytest
from opentelemetry.trace import Status, StatusCode, Tracer
from otel_traces import record_spans

from cegraph.connectors.otlp.span_export import otlp_json
from cegraph.connectors.trail.annotated import AnnotatedSetError
from cegraph.daemon.detect.eval_modes import evaluate

pytestmark = pytest.mark.long(minutes=2)

CEGRAPH = str(Path(sys.executable).parent / "cegraph")


def run_eval(*args: str, hash_seed: str = "0") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CEGRAPH_")} | {
        "PYTHONHASHSEED": hash_seed
    }
    return subprocess.run(
        [CEGRAPH, "eval-modes", *args], env=env, capture_output=True, text=True, timeout=600
    )


def scores_of(result: dict, variant: str) -> dict[str, dict]:
    [found] = [v for v in result["variants"] if v["variant"] == variant]
    return {
        s["method"].split(",")[0] if s["method"].startswith("(") else s["method"]: s for s in found["scores"]
    }


def test_gaia_online_modes_are_deterministic_and_beat_span_names_on_ari(trail_dataset):
    """On TRAIL-GAIA the online modes agree with the categories far more than span names do by ARI,
    and more than chance by AMI (on AMI they trail both baselines: docs/modes.md)."""
    first = run_eval("--dataset", str(trail_dataset), "--taxonomy", "trail", "--json", hash_seed="1")
    assert first.returncode == 0, first.stderr
    second = run_eval("--dataset", str(trail_dataset), "--taxonomy", "trail", "--json", hash_seed="2")
    result = json.loads(first.stdout)
    assert json.loads(second.stdout) == result
    assert result["seed"] == 0
    for variant in ("location only", "with critique"):
        scores = scores_of(result, variant)
        online, by_name = scores["cegraph online, at arrival"], scores["(a) span name"]
        assert online["errors"] == by_name["errors"] == 547
        assert online["ari"] > by_name["ari"] + 0.05 and online["ami"] > 0.1, variant
        assert scores["cegraph online, at the end"]["ami"] > by_name["ami"], variant
        assert scores["(b) batch KMeans"]["clusters"] == 19


@pytest.fixture(scope="module")
def other_split(trail_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twenty real GAIA executions laid out as a TRAIL split of another name ("Toybench")."""
    root = tmp_path_factory.mktemp("toybench")
    with tarfile.open(trail_dataset) as archive:
        members = {m.name: m for m in archive if m.isfile() and m.name.endswith(".json")}
        spans = sorted(n for n in members if "/data/GAIA/" in f"/{n}")[:20]
        for name in spans:
            stem = Path(name).stem
            annotation = next(n for n in members if n.endswith(f"processed_annotations_gaia/{stem}.json"))
            for source, target in ((name, f"data/Toybench/{stem}.json"),
                                   (annotation, f"processed_annotations_toybench/{stem}.json")):  # fmt: skip
                path = root / target
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.extractfile(members[source]).read())
    return root


def test_another_trail_split_is_found_by_its_folder(other_split: Path):
    result = run_eval("--dataset", str(other_split), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "Toybench" in report["dataset"]
    assert [v["variant"] for v in report["variants"]] == ["location only", "with critique"]
    for variant in report["variants"]:
        assert variant["errors"] > 20 and variant["categories"] >= 5
        assert {s["method"] for s in variant["scores"]} >= {"cegraph online, at arrival", "(a) span name"}


def test_two_splits_need_a_choice_and_a_wrong_split_is_named(other_split: Path, tmp_path: Path):
    both = tmp_path / "both"
    shutil.copytree(other_split, both)
    (both / "data" / "Other").mkdir()
    (both / "data" / "Other" / "x.json").write_text("{}")
    result = run_eval("--dataset", str(both))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "several splits (Other, Toybench): choose one with --split" in result.stderr
    chosen = run_eval("--dataset", str(both), "--split", "Toybench", "--json")
    assert chosen.returncode == 0, chosen.stderr


MECHANISMS = {
    # foreign category -> (what the failing LLM call answered, the reviewer's note)
    "bad-json": ("Sure! The order total is {n} euros.", "reply was prose, the caller needed a JSON object"),
    "wrong-tool": (
        '{{"tool": "weather", "args": {{"city": "{n}"}}}}',
        "picked the weather tool for a refund",
    ),
    "made-up-policy": ("Our policy allows refunds after {n} years.", "invented a refund policy"),
}


def _support_run(tracer: Tracer, category: str, index: int, rng: random.Random) -> None:
    """A single-LLM-node agent, as a GenAI-instrumented service records it: one node, several calls."""
    output, _ = MECHANISMS[category]
    agent = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support"}
    with tracer.start_as_current_span("invoke_agent support", attributes=agent):
        for call in range(3):
            failing = call == 2
            attributes = {
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "small-model",
                "gen_ai.input.messages": json.dumps([{"role": "user", "content": f"ticket {index}: help"}]),
                "gen_ai.output.messages": json.dumps([{"role": "assistant", "content": (
                    output.format(n=rng.randint(2, 99)) if failing else "Let me look at the ticket.")}]),
            }  # fmt: skip
            with tracer.start_as_current_span("chat small-model", attributes=attributes) as span:
                if failing and category == "wrong-tool":
                    span.set_status(Status(StatusCode.ERROR, "tool call rejected"))


def plain_set(folder: Path, traces: int = 45, *, critique: bool = True) -> Path:
    rng = random.Random(3)
    categories = [list(MECHANISMS)[i % len(MECHANISMS)] for i in range(traces)]
    labels, lines = [], []
    for index, category in enumerate(categories):
        spans = record_spans(lambda t, c=category, i=index: _support_run(t, c, i, rng),
                             resource={"service.name": "support-desk"})  # fmt: skip
        failing = [s for s in spans if s.name.startswith("chat")][-1]
        label = {"trace_id": format(failing.context.trace_id, "032x"),
                 "span_id": format(failing.context.span_id, "016x"), "category": category}  # fmt: skip
        if critique:
            label["critique"] = MECHANISMS[category][1]
        labels.append(label)
        lines.append(otlp_json(spans))
    (folder / "traces").mkdir(parents=True)
    (folder / "traces" / "part-1.jsonl").write_bytes(b"\n".join(lines[: traces // 2]) + b"\n")
    for number, line in enumerate(lines[traces // 2 :]):
        (folder / "traces" / f"request-{number}.json").write_bytes(line)
    (folder / "labels.jsonl").write_bytes(b"\n".join(orjson.dumps(label) for label in labels) + b"\n")
    return folder


def test_a_plain_set_with_categories_of_its_own(tmp_path: Path):
    folder = plain_set(tmp_path / "support")
    result = run_eval("--dataset", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for variant in report["variants"]:
        assert variant["categories"] == 3 and variant["errors"] == 45
        scores = scores_of(report, variant["variant"])
        assert scores["(a) span name"]["ami"] == pytest.approx(0.0, abs=1e-9)  # one node: no help
        # Three mechanisms on one LLM node, told apart by what each failure says.
        assert scores["cegraph online, at the end"]["ami"] > 0.5, variant["variant"]


def test_a_plain_set_without_critiques_has_one_variant(tmp_path: Path):
    result = evaluate(plain_set(tmp_path / "support", critique=False))
    assert [v.variant for v in result.variants] == ["location only"]


def test_unusable_sets_are_one_line_errors(tmp_path: Path):
    cases = {}
    (tmp_path / "empty").mkdir()
    cases["empty"] = "not a TRAIL-layout set"
    nowhere = plain_set(tmp_path / "nowhere", traces=6)
    (nowhere / "labels.jsonl").write_text('{"trace_id": "ab", "span_id": "cd", "category": "x"}\n')
    cases["nowhere"] = "0 labelled failures in 0 categories: nothing to score"
    single = plain_set(tmp_path / "single", traces=6)
    labels = (single / "labels.jsonl").read_bytes().splitlines()
    lines = [orjson.loads(line) | {"category": "same"} for line in labels]
    (single / "labels.jsonl").write_bytes(b"\n".join(map(orjson.dumps, lines)))
    cases["single"] = "in 1 categories: nothing to score"
    broken = plain_set(tmp_path / "broken", traces=6)
    (broken / "labels.jsonl").write_text('{"trace_id": "ab"}\n')
    cases["broken"] = "labels.jsonl:1: not a label"
    garbage = plain_set(tmp_path / "garbage", traces=6)
    (garbage / "traces" / "bad.json").write_text("[1, 2]")
    cases["garbage"] = "neither an OTLP/JSON request"
    for name, expected in cases.items():
        result = run_eval("--dataset", str(tmp_path / name))
        assert result.returncode == 1, (name, result.stdout)
        assert "Traceback" not in result.stderr and expected in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
    missing = run_eval("--dataset", str(tmp_path / "missing"))
    assert missing.returncode == 1 and "no dataset at" in missing.stderr


def test_trail_taxonomy_is_only_an_option(other_split: Path):
    as_given = evaluate(other_split, variants=("location only",))
    folded = evaluate(other_split, taxonomy="trail", variants=("location only",))
    assert as_given.variants[0].categories >= folded.variants[0].categories


def test_an_unreadable_set_raises_the_set_error(tmp_path: Path):
    (tmp_path / "labels.jsonl").write_text("")
    with pytest.raises(AnnotatedSetError, match=r"needs labels\.jsonl and a traces/ folder"):
        evaluate(tmp_path)
