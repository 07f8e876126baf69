"""The demo's report: plots, an HTML page, the event log and the published patches, in the output folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from cegraph.daemon.demo.scenario import DemoRun
from cegraph.daemon.detect.naming import named_modes
from cegraph.daemon.store import EventStore

MASS_PLOT = "mass_per_mode.png"
EFM_PLOT = "expected_failure_mass.png"

# the page's template, beside this module (package data)
PAGE = jinja2.Environment(
    loader=jinja2.PackageLoader("cegraph.daemon.demo", "."), autoescape=True
).get_template("report.html")


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
        "decisions": [
            {"version": d.version, "decision": d.decision, "reason": d.reason} for d in run.decisions
        ],
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
        smooth = [
            sum(rates[max(0, i - 2) : i + 1]) / len(rates[max(0, i - 2) : i + 1]) for i in range(len(rates))
        ]
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
        modes = named_modes(store)
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
        PAGE.render(
            run=run,
            summary=facts,
            modes=modes,
            mass_plot=MASS_PLOT,
            efm_plot=EFM_PLOT,
            store=out / "cegraph.duckdb",
        )
    )
    names = ["report.html", MASS_PLOT, EFM_PLOT, "events.jsonl", "summary.json"]
    return {name: out / name for name in names} | {"patches": patches}
