"""The `cegraph` command line.

Every command loads and validates the settings first, so a bad value stops it with a message naming
the setting, before anything connects or writes.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cegraph.daemon.cli.common import (
    JsonFlag,
    err,
    fail,
    from_daemon_or_store,
    open_store,
    out,
    settings_or_exit,
)
from cegraph.daemon.cli.demo import demo
from cegraph.daemon.cli.patches import patches
from cegraph.daemon.cli.simulate import simulate
from cegraph.daemon.cli.workflows import workflows
from cegraph.daemon.settings import masked

app = typer.Typer(
    name="cegraph",
    help="Failure-driven continuous improvement for LLM workflows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, "" if value is None else str(value)))
    return rows


def _print_nested(data: dict, as_json: bool, columns: tuple[str, str], title: str) -> None:
    """Nested data as JSON, or as a two-column table of dotted names."""
    if as_json:
        out.print_json(json.dumps(data))
        return
    table = Table(*columns, title=title)
    for name, value in _flatten(data):
        table.add_row(name, value)
    out.print(table)


@app.command()
def config(as_json: JsonFlag = False) -> None:
    """Show the effective settings (secrets masked)."""
    _print_nested(masked(settings_or_exit()), as_json, ("setting", "value"), "cegraph settings")


@app.command()
def version() -> None:
    """Print the cegraph version."""
    out.print(package_version("cegraph"))


@app.command()
def run(
    stages: Annotated[
        str | None,
        typer.Option(
            help="Stages this process runs, of ingest,detect,refine,rollout (default: all, or "
            "CEGRAPH_STAGES). Several `--stages ingest` members share the spans partitions and "
            "publish to the failures topic; one `--stages detect,rollout` reads it and sends "
            "refinement jobs to `--stages refine` workers (with refine as well, it runs them itself).",
        ),
    ] = None,
) -> None:
    """Run the daemon: consume traces from Kafka, serve the HTTP API and metrics."""
    if stages is not None:
        os.environ["CEGRAPH_STAGES"] = stages  # validated with the rest, named as the setting
    settings = settings_or_exit()
    from cegraph.daemon.app import serve
    from cegraph.daemon.store import StoreError

    try:
        serve(settings)
    except StoreError as error:  # a corrupt, foreign or locked file: one line, not a traceback
        fail(str(error))


@app.command()
def stats(as_json: JsonFlag = False) -> None:
    """Counts of spans, executions, failures, feedback, amendments, dead letters, and stored offsets.

    Reads through the daemon's HTTP API while it runs, else the DuckDB file.
    """
    data = from_daemon_or_store(settings_or_exit(), "/stats", lambda store: store.stats())
    _print_nested(data, as_json, ("count", "value"), "cegraph stats")


@app.command()
def modes(as_json: JsonFlag = False) -> None:
    """Failure modes: id, workflow, version, mass, support, trend and description.

    Reads through the daemon's HTTP API while it runs, else the DuckDB file.
    """
    from cegraph.daemon.detect.naming import named_modes

    rows = from_daemon_or_store(settings_or_exit(), "/modes", named_modes)
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table(
        "mode", "workflow", "version", "mass", "support", "trend", "where", "what", title="failure modes"
    )
    for row in rows:
        description = row.get("description") or {}
        trend = row.get("trend")
        what = escape(description.get("label") or ", ".join(description.get("terms", [])[:5]))
        if row.get("name"):
            what = f"{what} [dim](LLM name: {escape(row['name'])})[/]"
        if description.get("category"):
            what = f"{what} [dim](TRAIL hint: {escape(description['category'])})[/]"
        mass, support = f"{row['mass']:.4f}", str(row["support"])
        trend_text = "" if trend is None else f"{trend:+.4f}"
        table.add_row(
            row["mode"], row["workflow_id"], row["workflow_version"], mass, support, trend_text,
            description.get("node", ""), what,
        )  # fmt: skip
    out.print(table)


@app.command()
def rebuild() -> None:
    """Recompute every projection from the event log (stop the daemon first: DuckDB has one writer)."""
    settings = settings_or_exit()
    store = open_store(settings, read_only=False)
    try:
        before = store.projection_digest()
        replayed = store.rebuild()
        after = store.projection_digest()
    finally:
        store.close()
    out.print(f"replayed {replayed} events into {', '.join(after)}")
    for table, digest in after.items():
        same = "unchanged" if before.get(table) == digest else "changed"
        out.print(f"  {table}: {digest.split(':')[-1]} rows, {same}")


@app.command("import-trail")
def import_trail(
    dataset: Annotated[Path, typer.Option(help="TRAIL split: the .tar.gz or its extracted folder.")],
    split: Annotated[
        str | None, typer.Option(help="Which split of the dataset (default: the only one it has).")
    ] = None,
    one_trace_per_message: Annotated[
        bool,
        typer.Option("--one-trace-per-message/--batched", help="As the collector's partition_traces_by_id."),
    ] = True,
    max_message_bytes: Annotated[int, typer.Option(help="Largest Kafka message written.")] = 921_600,
    feedback: Annotated[
        bool, typer.Option(help="Also send each annotated error as feedback naming its span.")
    ] = True,
    with_critique: Annotated[
        bool, typer.Option(help="Put the annotation's description in the critique.")
    ] = False,
) -> None:
    """Send a TRAIL trace set to the spans topic as OTLP (and its annotations to the feedback topic)."""
    settings = settings_or_exit()
    from cegraph.connectors.kafka.client import kafka_python_options
    from cegraph.connectors.trail.parse import TrailFormatError
    from cegraph.connectors.trail.publish import publish_trail

    if not dataset.exists():
        err.print(f"[bold red]cegraph:[/] no dataset at {dataset}")
        raise typer.Exit(1)
    try:
        report = publish_trail(
            dataset,
            kafka_python_options(settings.kafka),
            settings.kafka.spans_topic,
            one_trace_per_message,
            max_message_bytes=max_message_bytes,
            feedback_topic=settings.kafka.feedback_topic if feedback else None,
            with_critique=with_critique,
            split=split,
        )
    except TrailFormatError as error:
        err.print(f"[bold red]cegraph:[/] {error}", soft_wrap=True)
        raise typer.Exit(1) from None
    out.print(
        f"sent {report.traces} traces ({report.spans} spans) in {report.messages} messages to "
        f"{settings.kafka.spans_topic}; {report.feedback} feedback records"
    )
    if report.missing_span_trees:
        out.print(
            f"{len(report.missing_span_trees)} traces have no span tree in the dataset and were skipped"
        )


@app.command("eval-modes")
def eval_modes(
    dataset: Annotated[
        Path,
        typer.Option(
            help="Annotated trace set: a TRAIL-layout split (.tar.gz or folder) or a plain-format folder "
            "(labels.jsonl + traces/, docs/modes.md)."
        ),
    ],
    split: Annotated[
        str | None, typer.Option(help="TRAIL split (data/<split>/); default: the only one the set has.")
    ] = None,
    taxonomy: Annotated[
        str, typer.Option(help="'none': categories as given; 'trail': fold TRAIL's spelling variants.")
    ] = "none",
    seed: Annotated[int, typer.Option(help="Order of the executions and KMeans' start.")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Score discovered failure modes against human categories (AMI, ARI, NMI, purity), beside baselines.

    Runs the traces through the same online path as production; each label arrives as feedback
    naming its span, once without its text (location only) and once with its critique.
    """
    settings = settings_or_exit()
    from cegraph.connectors.trail.annotated import AnnotatedSetError
    from cegraph.daemon.detect.eval_modes import evaluate

    if taxonomy not in ("none", "trail"):
        err.print(f"[bold red]cegraph:[/] --taxonomy must be 'none' or 'trail', not {taxonomy!r}")
        raise typer.Exit(2)
    try:
        result = evaluate(dataset, split=split, taxonomy=taxonomy, seed=seed, settings=settings.detector)
    except AnnotatedSetError as error:
        err.print(f"[bold red]cegraph:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except Exception as error:  # an annotated set is outside data: one line, never a traceback
        reason = escape(f"eval-modes failed on {dataset}: {type(error).__name__}: {error}")
        err.print(f"[bold red]cegraph:[/] {reason}", soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    for variant in result.variants:
        table = Table(
            "method", "AMI", "ARI", "NMI", "purity", "modes", "errors",
            title=f"{result.dataset}, {variant.variant}: {variant.errors} labelled failures, "
            f"{variant.categories} categories, seed {result.seed}",
        )  # fmt: skip
        for s in variant.scores:
            table.add_row(
                s.method, f"{s.ami:.3f}", f"{s.ari:.3f}", f"{s.nmi:.3f}", f"{s.purity:.3f}", str(s.clusters),
                str(s.errors),
            )  # fmt: skip
        out.print(table)
    if result.skipped:
        out.print(
            f"{result.skipped} traces or labels were left out (no span tree, or a span that is not there)"
        )


app.command()(simulate)
app.command()(demo)
app.add_typer(workflows)
app.add_typer(patches)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
