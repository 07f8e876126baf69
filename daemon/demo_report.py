"""The demo's report: plots, an HTML page, the event log and the published patches, in the output folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from cegraph.daemon.demo import DemoRun  # noqa: E402
from cegraph.daemon.store import EventStore  # noqa: E402

MASS_PLOT = "mass_per_mode.png"
EFM_PLOT = "expected_failure_mass.png"

PAGE = jinja2.Template(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cegraph demo, seed {{ run.seed }}</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:1px 3px}</style></head><body>
<h1>cegraph demo (seed {{ run.seed }})</h1>
<p>{{ run.executions }} executions of the <code>service</code> workflow in {{ "%.0f"|format(run.elapsed_s) }} s;
expected failure mass of the stable track: peak {{ "%.3f"|format(summary.peak_efm) }}, final
{{ "%.3f"|format(summary.final_efm) }} ({{ "%.0f"|format(100 * summary.reduction) }}% below the peak).</p>
<h2>Planted failure modes</h2>
<table><tr><th>node</th><th>planted</th><th>found as</th><th>patch</th><th>edits</th><th>canary</th></tr>
{% for row in summary.planted %}<tr><td>{{ row.node }}</td><td>{{ row.planted }}</td>
<td>{{ row.modes|join(", ") or "not found" }}</td><td>{{ row.patch or "none" }}</td>
<td>{{ row.edits|join("; ") }}</td><td>{{ row.decision or "-" }}</td></tr>{% endfor %}</table>
<h2>Failure mass per mode</h2><img src="{{ mass_plot }}" alt="failure mass per mode over executions">
<h2>Expected failure mass</h2><img src="{{ efm_plot }}" alt="expected failure mass before and after">
<h2>Patches</h2>
<table><tr><th>version</th><th>mode</th><th>edits</th><th>target mass (shadow)</th><th>LLM calls</th><th>file</th></tr>
{% for patch in run.patches %}{% set r = patch.rationale %}<tr><td>{{ patch.base_version }} &rarr; {{ patch.new_version }}</td>
<td>{{ r.mode }}</td><td>{% for e in r.edits %}{{ e.operator }} on {{ e.node }} ({{ e.proposer }}){% if not loop.last %}; {% endif %}{% endfor %}</td>
<td>{{ "%.3f"|format(r.verification.target_before) }} &rarr; {{ "%.3f"|format(r.verification.target_after) }}</td>
<td>{{ r.cost.llm_calls }}</td><td><a href="patches/{{ patch.new_version }}.json">patches/{{ patch.new_version }}.json</a></td></tr>{% endfor %}</table>
<h2>Canary decisions</h2>
<table><tr><th>version</th><th>decision</th><th>reason</th></tr>
{% for d in run.decisions %}<tr><td>{{ d.version }}</td><td>{{ d.decision }}</td><td>{{ d.reason }}</td></tr>{% endfor %}</table>
<p>The whole event log: <a href="events.jsonl">events.jsonl</a>; the DuckDB store: <code>cegraph.duckdb</code>
(<code>CEGRAPH_STORE__PATH={{ store }} cegraph modes</code>, <code>cegraph patches list</code>).</p>
</body></html>
""",
    autoescape=True,
)


def summary(run: DemoRun) -> dict[str, Any]:
    efm = run.smoothed_efm()
    peak = max(efm, default=0.0)
    final = efm[-1] if efm else 0.0
    return {
        "seed": run.seed,
        "executions": run.executions,
        "elapsed_s": round(run.elapsed_s, 1),
        "peak_efm": peak,
        "final_efm": final,
        "reduction": (peak - final) / peak if peak else 0.0,
        "planted": run.planted(),
        "patches": [p.new_version for p in run.patches],
        "decisions": [{"version": d.version, "decision": d.decision, "reason": d.reason} for d in run.decisions],
    }


def _markers(axis: Any, run: DemoRun) -> None:
    """Patch publications and canary decisions as vertical lines, labelled once each."""
    seen: set[str] = set()
    for tick in run.ticks:
        for version in tick.patches:
            label = None if "patch" in seen else "patch published"
            seen.add("patch")
            axis.axvline(tick.executions, color="tab:blue", linestyle="--", linewidth=1, label=label)
            axis.annotate(version, (tick.executions, 1), xycoords=("data", "axes fraction"), fontsize=7,
                          rotation=90, va="top", ha="right")  # fmt: skip
        for _, decision in tick.decisions:
            colour = "tab:green" if decision == "promote" else "tab:red"
            label = None if decision in seen else f"canary {decision}"
            seen.add(decision)
            axis.axvline(tick.executions, color=colour, linestyle=":", linewidth=1.5, label=label)


def plot_modes(run: DemoRun, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(10, 4.5))
    xs = [tick.executions for tick in run.ticks]
    heaviest = sorted(run.modes, key=lambda m: -run.modes[m]["failures"])[:8]
    for mode in heaviest:
        rates = [t.mode_failures.get(mode, 0) / t.stable_runs if t.stable_runs else 0.0 for t in run.ticks]
        smooth = [sum(rates[max(0, i - 2) : i + 1]) / len(rates[max(0, i - 2) : i + 1]) for i in range(len(rates))]
        axis.plot(xs, smooth, label=f"{mode} ({run.modes[mode]['node']})")
    _markers(axis, run)
    axis.set_xlabel("executions")
    axis.set_ylabel("failure mass (failures per stable execution)")
    axis.set_title("Failure mass per mode, stable track (3-tick moving average)")
    axis.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_efm(run: DemoRun, path: Path) -> None:
    figure, (line, bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    efm = run.smoothed_efm()
    line.plot([t.executions for t in run.ticks], efm, color="black", label="stable track")
    _markers(line, run)
    line.set_xlabel("executions")
    line.set_ylabel("expected failure mass")
    line.set_title("Expected failure mass (5-tick moving average)")
    line.legend(fontsize=8)
    facts = summary(run)
    bars.bar(["peak", "final"], [facts["peak_efm"], facts["final_efm"]], color=["tab:red", "tab:green"])
    bars.set_title(f"{100 * facts['reduction']:.0f}% below the peak")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(run: DemoRun) -> dict[str, Path]:
    """Every report file; returns them by name."""
    out = run.out
    plot_modes(run, out / MASS_PLOT)
    plot_efm(run, out / EFM_PLOT)
    patches = out / "patches"
    patches.mkdir(exist_ok=True)
    for patch in run.patches:
        (patches / f"{patch.new_version}.json").write_text(patch.model_dump_json(by_alias=True, indent=2))
    store = EventStore(out / "cegraph.duckdb", read_only=True)
    try:
        with (out / "events.jsonl").open("w") as log:
            for seq, recorded_at, kind, key, payload in store.query(
                "SELECT seq, recorded_at, type, key, payload FROM events ORDER BY seq"
            ):
                log.write(json.dumps({"seq": seq, "recorded_at": str(recorded_at), "type": kind, "key": key,
                                      "payload": json.loads(payload)}) + "\n")  # fmt: skip
    finally:
        store.close()
    facts = summary(run)
    (out / "summary.json").write_text(json.dumps(facts, indent=2))
    (out / "report.html").write_text(
        PAGE.render(run=run, summary=facts, mass_plot=MASS_PLOT, efm_plot=EFM_PLOT, store=out / "cegraph.duckdb")
    )
    names = ["report.html", MASS_PLOT, EFM_PLOT, "events.jsonl", "summary.json"]
    return {name: out / name for name in names} | {"patches": patches}
