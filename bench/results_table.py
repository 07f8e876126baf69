"""`bench/results.md`: the figures of `bench/results.json` as one table, with the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    system = f"{platform.system()}, Python {platform.python_version()}"
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB, {system}"


def rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    found = []
    if ingest := results.get("ingest"):
        local = ingest["in_process"]
        if "stage_1_spans_per_s" in local:
            found.append(
                (
                    ingest["command"],
                    "in process: spans/s of stage 1 (decode, normalize, assemble, commit), columnar",
                    f"{local['stage_1_spans_per_s']:,.0f} "
                    f"({local['stage_1_ratio_to_ceiling']:.0%} of the ceiling)",
                    f"ceiling {local['ceiling_spans_per_s']:,.0f}; per-span path "
                    f"{local['stage_1_reference_spans_per_s']:,.0f}",
                    "40% of the ceiling",
                )
            )
        found.append(
            (
                ingest["command"],
                "in process: spans/s end to end",
                f"{local['end_to_end_spans_per_s']:,.0f} ({local['ratio_to_ceiling']:.0%} of the ceiling)",
                f"ceiling {local['ceiling_spans_per_s']:,.0f}",
                "50,000 and 25%",
            )
        )
        if broker := ingest.get("kafka"):
            found.append(
                (
                    ingest["command"],
                    "through the broker: spans/s end to end",
                    f"{broker['end_to_end_spans_per_s']:,.0f} ({broker['ratio_to_ceiling']:.0%})",
                    f"plain {broker.get('ceiling_client', 'kafka-python')} consumer "
                    f"{broker['ceiling_spans_per_s']:,.0f}",
                    "80% of the best plain consumer",
                )
            )
    if scale := results.get("scale"):
        one, two = scale["deployments"]
        found.append(
            (
                scale["command"],
                "ingest members' spans/s through the broker, 1 and 2 members (+ a detect member)",
                f"{one['ingest_spans_per_s']:,.0f} and {two['ingest_spans_per_s']:,.0f} "
                f"({scale['speedup_2_over_1']:.2f}x); cores busy {one['cores_busy']:.1f} and "
                f"{two['cores_busy']:.1f} of {scale['machine_cores']}",
                "prototype 1.7-1.9x",
                "",
            )
        )
    if density := results.get("density"):
        first, last = density["bounded_state"][0], density["bounded_state"][-1]
        found.append(
            (
                density["command"],
                f"failures/s through featurizer and tracker, {last['signatures']:,} failures",
                f"{last['failures_per_s']:,.0f}; {last['micro_clusters']} micro-clusters, "
                f"{last['modes']} modes; max RSS {last['max_rss_mb']:.0f} MB",
                f"at {first['signatures']:,}: {first['micro_clusters']} micro-clusters, "
                f"max RSS {first['max_rss_mb']:.0f} MB",
                "5,000 failures/s; state flat",
            )
        )
    if detection := results.get("detection"):
        latency = detection["median_latency_executions"]
        found.append(
            (
                detection["command"],
                "median latency from onset to trigger, executions",
                f"{latency['cegraph']:.0f}",
                f"oracle {latency['oracle']:.0f}",
                f"within 1.5x: {detection['median_ratio_to_oracle']:.2f}x",
            )
        )
    if refinement := results.get("refinement"):
        last = str(refinement["budgets_llm_calls"][-1])
        for scenario, summary in refinement["summary"].items():

            def rate(name: str, summary=summary) -> str:
                value = summary["methods"][name][last]["failure_rate"]
                return f"{value['mean']:.3f} ({value['low']:.3f} to {value['high']:.3f})"

            others = [name for name in summary["methods"] if name != "cegraph"]
            found.append(
                (
                    refinement["command"],
                    f"{scenario}: held-out failure rate at {int(last):,} calls, mean (95% interval), "
                    f"{summary['seeds']} seeds; base {summary['base_failure_rate']['mean']:.3f} "
                    "(every budget in bench/results.json)",
                    rate("cegraph"),
                    "; ".join(f"{name} {rate(name)}" for name in others),
                    "below AFlow-style and random edits, intervals apart",
                )
            )
    if aflow_real := results.get("refinement_aflow_real"):
        seeds = [row for rows in aflow_real["per_seed"].values() for row in rows.values()]
        notes = [row["methods"]["aflow"]["notes"] for row in seeds]
        valid, asked = (sum(n[k] for n in notes) for k in ("expansions_from_llm", "optimizer_calls"))
        last = str(aflow_real["budgets_llm_calls"][-1])
        after = [row["methods"]["aflow"]["budgets"][last]["failure_rate"] for row in seeds]
        before = [row["base"]["failure_rate"] for row in seeds]
        found.append(
            (
                "bench_refinement.py --aflow-model real",
                f"AFlow-style search, {aflow_real['aflow_optimizer']['model']} as its optimizer "
                f"({', '.join(aflow_real['per_seed'])}; {len(seeds)} seeds): answers parsed into valid edits",
                f"{valid} of {asked}",
                f"held-out failure rate {sum(before) / len(before):.3f} -> {sum(after) / len(after):.3f} "
                f"at {int(last):,} calls (mean over seeds)",
                "",
            )
        )
    if real := results.get("real"):

        def mass(name: str) -> str:
            method = real["methods"][name]
            overall = method["failure_mass"]["any failure"]
            return f"{overall['before']:.2f} -> {overall['after']:.2f} ({method['llm_calls']} calls)"

        found.append(
            (
                real["command"],
                f"held-out failure rate before -> after, {real['model']} on {real['test_tasks']} "
                f"{real['family']} tasks (per mode in results.json)",
                mass("cegraph"),
                f"scalar search {mass('scalar')}; random {mass('random')}",
                "",
            )
        )
    if memory := results.get("memory"):
        points = memory["checkpoints"]
        found.append(
            (
                memory["command"],
                "RSS MB / DuckDB MB at " + ", ".join(f"{p['executions']:,}" for p in points),
                "; ".join(f"{p['rss_mb']:.0f} / {p['duckdb_mb']:.0f}" for p in points),
                "",
                f"flat within 10%, < 500 MB: {memory['rss_growth']:+.0%}",
            )
        )
    if sandbox := results.get("sandbox"):
        found.append(
            (
                sandbox["command"],
                "ms per program, isolated / bare interpreter: one at a time; four at once; run_tests",
                f"{sandbox['isolated_sequential_ms']:.0f} / {sandbox['bare_sequential_ms']:.0f}; "
                f"{sandbox['isolated_concurrent_ms']:.0f} / {sandbox['bare_concurrent_ms']:.0f}; "
                f"{sandbox['isolated_run_tests_ms']:.0f}",
                f"overhead {sandbox['overhead_sequential_ms']:+.0f} ms one at a time, "
                f"{sandbox['overhead_concurrent_ms']:+.0f} ms four at once",
                "",
            )
        )
    return found


def main() -> None:
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results.json")
    table = [
        "| command | figure | cegraph | reference (same run) | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    table += [
        "| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(row)) + " |"
        for row in rows(json.loads(source.read_text()))
    ]
    text = f"# make bench\n\nMachine: {machine()}\n\n" + "\n".join(table) + "\n"
    source.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
