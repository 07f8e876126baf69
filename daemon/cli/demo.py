"""`cegraph demo`: the whole loop on the embedded default, with live progress and a report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from cegraph.daemon.cli.common import out


def demo(
    seed: Annotated[int, typer.Option(help="Seed of the world, the traffic and every decision.")] = 7,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (replaced if it exists).")] = Path(
        "demo-output"
    ),
    max_executions: Annotated[
        int, typer.Option(min=1_000, help="Stop here if not converged before.")
    ] = 20_000,
    kafka: Annotated[
        str | None,
        typer.Option(
            metavar="BOOTSTRAP",
            help="Run the scenario over this Kafka broker instead: `cegraph run` and `cegraph simulate` "
            "as separate processes (make demo-kafka starts a local broker).",
        ),
    ] = None,
) -> None:
    """Simulated traffic through a routed support workflow with three failure modes that begin at
    different times; the embedded daemon finds them, refines in shadow, publishes patches, and the
    canary judge promotes or rolls back each, until the loop converges. Writes report.html, plots,
    the event log and the patches to --out."""
    from cegraph.daemon.demo.report import summary, write_report
    from cegraph.daemon.demo.scenario import SIGNING_KEY_FILE, Demo, DemoRun

    logging.basicConfig(level=logging.WARNING)
    with Live(console=out, refresh_per_second=4) as live:
        if kafka is not None:
            import shutil

            from cegraph.daemon.demo.kafka import run_over_kafka

            if out_dir.exists():
                shutil.rmtree(out_dir)
            run = run_over_kafka(
                seed, out_dir, kafka, on_progress=lambda state: live.update(_kafka_progress(state))
            )
        else:
            runner = Demo(seed, out_dir, max_executions=max_executions)

            def show(run: DemoRun) -> None:
                live.update(_progress(run, runner))

            run = runner.run(show)
    files = write_report(run)
    facts = summary(run)
    table = Table("planted mode", "found as", "patch", "edits", "canary", title=f"cegraph demo, seed {seed}")
    for row in facts["planted"]:
        table.add_row(row["planted"], ", ".join(row["modes"]) or "not found", row["patch"] or "none",
                      "; ".join(row["edits"]), row["decision"] or "-")  # fmt: skip
    out.print(table)
    out.print(
        f"expected failure mass: peak {facts['peak_efm']:.3f}, final {facts['final_efm']:.3f} "
        f"({100 * facts['reduction']:.0f}% below the peak); "
        f"{run.executions} executions in {run.elapsed_s:.0f} s"
    )
    out.print(f"report: {files['report.html']}")
    key_file = out_dir / SIGNING_KEY_FILE
    out.print(f"patches are signed with a key made for this run: {key_file.read_text().strip()} ({key_file})")


def _progress(run, runner) -> Group:
    tick = run.ticks[-1]
    rate = run.executions / run.elapsed_s if run.elapsed_s else 0.0
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"[bold]{run.executions}[/] executions", f"{rate:,.0f}/s", f"stable [bold]{tick.stable}[/]",
        f"canary [bold]{tick.canary or '-'}[/]", f"patches {len(run.patches)}",
        f"decisions {len(run.decisions)}",
    )  # fmt: skip
    modes = Table("mode", "node", "failures", "mass (last tick)", title="failure modes", title_justify="left")
    for mode in sorted(run.modes, key=lambda m: -run.modes[m]["failures"])[:6]:
        rate_now = tick.mode_failures.get(mode, 0) / tick.stable_runs if tick.stable_runs else 0.0
        modes.add_row(mode, run.modes[mode]["node"], str(run.modes[mode]["failures"]), f"{rate_now:.3f}")
    jobs = Table("job", "mode", "outcome", "LLM calls", title="refinement jobs", title_justify="left")
    for job in [j for t in run.ticks for j in t.jobs][-4:]:
        jobs.add_row(job["job_id"], job["mode"], job["outcome"], str(job["cost"]["llm_calls"]))
    canary = runner.traffic.snapshot()
    line = f"expected failure mass (stable, last ticks) {run.smoothed_efm()[-1]:.3f}"
    if canary.canary:
        line += f"; canary {canary.canary} at weight {canary.canary_weight:.2f}"
    return Group(head, modes, jobs, line)


def _kafka_progress(state: dict) -> Group:
    """What the daemon's API says while the processes run."""
    if not state["traffic_running"]:
        traffic = "done, the daemon is catching up"
    else:
        traffic = "paused while a refinement job runs" if state["traffic_paused"] else "running"
    head = f"[bold]{state['executions']}[/] executions stored; traffic {traffic}"
    modes = Table("mode", "version", "mass", "where", title="failure modes", title_justify="left")
    for row in state["modes"][:6]:
        modes.add_row(
            row["mode"], row["workflow_version"], f"{row['mass']:.3f}", row["description"].get("node", "")
        )
    patches = Table("patch", "state", "canary", title="patches and canaries", title_justify="left")
    decided = {c["version"]: c.get("decision") or c["state"] for c in state["canaries"]}
    for row in state["patches"]:
        patches.add_row(
            f"{row['base_version']} -> {row['new_version']}",
            row["state"],
            decided.get(row["new_version"], "-"),
        )
    return Group(head, modes, patches, f"refinement jobs running: {state['jobs_running']:.0f}")
