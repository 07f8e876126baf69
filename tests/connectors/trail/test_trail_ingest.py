"""TRAIL's real agent traces, converted to OTLP and sent through Kafka, become executions whose node
trees match the source span trees; their expert annotations arrive as feedback naming the span."""

from __future__ import annotations

import os
import subprocess

from daemon_proc import Scenario

from cegraph.connectors.trail.labels import annotations_to_feedback
from cegraph.connectors.trail.otlp import span_id_bytes, trace_id_bytes
from cegraph.connectors.trail.parse import iter_trail
from cegraph.daemon.demo.process import CEGRAPH
from cegraph.daemon.store import EventStore


def test_trail_traces_become_executions_with_the_source_trees(kafka_bootstrap, tmp_path, trail_dataset):
    traces = [t for t in iter_trail(trail_dataset) if t.has_span_tree]
    expected = {
        trace_id_bytes(t.trace_id).hex(): {
            (
                span_id_bytes(parent.span_id).hex() if parent else "",
                span_id_bytes(span.span_id).hex(),
                span.span_name,
            )
            for span, parent in t.iter_spans()
        }
        for t in traces
    }
    annotations = sum(len(t.errors) for t in traces)
    # Feedback is one signal per distinct content (issue 13): annotations of one span that say the same
    # (no critique is sent without --with-critique) are one signal, not several.
    signals = len({
        (f["trace_id"], f["span_id"], f["outcome"], f["source"], f["critique"])
        for t in traces for f in annotations_to_feedback(t)
    })  # fmt: skip
    assert 0 < signals < annotations
    scenario = Scenario(kafka_bootstrap, tmp_path)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CEGRAPH_")}
    sent = subprocess.run(
        [CEGRAPH, "import-trail", "--dataset", str(trail_dataset)],
        env=clean | scenario.daemon.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert f"sent {len(traces)} traces" in sent.stdout and len(traces) == 113
    assert "4 traces have no span tree" in sent.stdout
    scenario.daemon.start()
    try:
        stats = scenario.daemon.wait_for(
            lambda s: s["executions"]["total"] >= len(traces) and s["feedback"] >= signals, timeout=180
        )
    finally:
        scenario.daemon.stop()
    assert stats["dead_letters"] == 0
    assert stats["spans"] == sum(len(spans) for spans in expected.values())
    store = EventStore(scenario.store_path, read_only=True)
    try:
        stored: dict[str, set[tuple[str, str, str]]] = {}
        for trace_id, parent, span, name in store.query(
            "SELECT trace_id, parent_span_id, span_id, name FROM nodes"
        ):
            stored.setdefault(trace_id, set()).add((parent, span, name))
        kinds = dict(store.query("SELECT kind, count(*) FROM nodes GROUP BY kind"))
        located = store.query("SELECT count(*) FROM feedback f JOIN nodes n USING (trace_id, span_id)")[0][0]
    finally:
        store.close()
    assert stored == expected
    assert kinds.get("llm", 0) > 0 and kinds.get("tool", 0) > 0, kinds  # OpenInference kinds understood
    assert stats["feedback"] == located == signals  # every signal names a stored span
