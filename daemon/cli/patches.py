"""`cegraph patches`: the patches the daemon made (list, show, diff) and a check of one (verify)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cegraph.daemon.cli.common import JsonFlag, fail, from_daemon_or_store, load_spec, out, settings_or_exit

patches = typer.Typer(name="patches", help="Versioned, signed workflow patches.", no_args_is_help=True)


def _rows() -> list[dict[str, Any]]:
    from cegraph.daemon.refine.patch_outbox import PatchOutbox, patch_rows

    settings = settings_or_exit()
    return from_daemon_or_store(
        settings, "/patches", lambda store: patch_rows(PatchOutbox.configured(store, settings))
    )


def _rejected() -> list[dict[str, Any]]:
    from cegraph.daemon.refine.patch_outbox import rejected_rows

    return from_daemon_or_store(settings_or_exit(), "/patches/rejected", rejected_rows)


def _find(workflow: str, version: str | None) -> dict[str, Any]:
    """The patch to `version` of `workflow` (the latest one without a version)."""
    found = [
        row for row in _rows() if row["workflow_id"] == workflow and version in (None, row["new_version"])
    ]
    if not found:
        fail(
            f"no patch of {workflow}"
            + (f" to {version}" if version else "")
            + " (see `cegraph patches list`)"
        )
    return found[-1]


@patches.command("list")
def list_(as_json: JsonFlag = False) -> None:
    """Every patch the daemon made, oldest first, with its state: published, held or due; and every edit
    the text policy rejected, with the reason (it never became a patch)."""
    rows = _rows()
    rejected = _rejected()
    if as_json:
        listed = [{k: v for k, v in r.items() if k != "patch"} for r in rows]
        listed += [{**r, "new_version": None, "published": None} for r in rejected]
        out.print_json(json.dumps(sorted(listed, key=lambda r: r["created_at"])))
        return
    table = Table("workflow", "base", "new", "mode", "target mass", "LLM calls", "state", title="patches")
    for row in rows:
        rationale = row["patch"].get("rationale") or {}
        check = rationale.get("verification") or {}
        mass = f"{check['target_before']:.3f} -> {check['target_after']:.3f}" if check else ""
        calls = str((rationale.get("cost") or {}).get("llm_calls", ""))
        table.add_row(row["workflow_id"], row["base_version"], row["new_version"], rationale.get("mode", ""),
                      mass, calls, row["state"])  # fmt: skip
    for row in rejected:
        edit = row["edit"]
        table.add_row(row["workflow_id"], row["base_version"], "-", f"{edit['operator']} on {edit['node']}",
                      "", "", row["state"], style="red")  # fmt: skip
    out.print(table)


@patches.command()
def approve(
    patch: Annotated[str, typer.Argument(help="WORKFLOW@VERSION, as `cegraph patches list` shows it.")],
) -> None:
    """Let a patch whose edits carry free text be published (with CEGRAPH_REFINER__APPROVE_FREE_TEXT=true
    such a patch waits for this). Read its edits first: `cegraph patches show WORKFLOW VERSION`. Through
    the running daemon (it needs CEGRAPH_HTTP__TOKEN), else in the store."""
    import getpass

    from cegraph.daemon.cli.common import from_daemon, open_store
    from cegraph.daemon.refine.patch_outbox import ApprovalError, PatchOutbox

    workflow, _, version = patch.rpartition("@")
    if not workflow or not version:
        fail(f"{patch!r} is not WORKFLOW@VERSION")
    settings = settings_or_exit()
    who = getpass.getuser()
    if from_daemon(settings, f"/patches/{workflow}/{version}/approve", {"approved_by": who}) is None:
        if not settings.store.path.exists():
            fail(f"no store at {settings.store.path} (CEGRAPH_STORE__PATH)")
        store = open_store(settings, read_only=False)
        try:
            PatchOutbox.configured(store, settings).approve(workflow, version, who)
        except ApprovalError as error:
            fail(str(error))
        finally:
            store.close()
    out.print(f"approved: {workflow}@{version} (by {who}); the publisher sends it when nothing else holds it")


@patches.command()
def show(
    workflow: Annotated[str, typer.Argument(help="Workflow id.")],
    version: Annotated[
        str | None, typer.Argument(help="The patch's new version (default: the latest).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """One patch: why (mode, counterexamples, edits), the evidence (paired shadow statistics), what it
    cost (LLM calls, tokens, wall time), its state and its operations."""
    row = _find(workflow, version)
    patch = row["patch"]
    if as_json:
        out.print_json(json.dumps(patch))
        return
    rationale = patch.get("rationale") or {}
    check, cost = rationale.get("verification") or {}, rationale.get("cost") or {}
    out.print(
        f"[bold]{patch['workflow_id']} {patch['base_version']} -> {patch['new_version']}[/] ({row['state']})"
    )
    out.print(f"content hash  {patch['content_hash']}")
    out.print(f"signature     {patch.get('signature') or 'none'}")
    if rationale:
        terms = ", ".join(rationale["mode_description"].get("terms", [])[:6])
        out.print(f"mode          {rationale['mode']} ({terms})")
        edits = "; ".join(f"{e['operator']} on {e['node']} ({e['proposer']})" for e in rationale["edits"])
        out.print(f"edits         {edits}")
        for edit in rationale["edits"]:  # the free text, for whoever approves it
            for name in ("instruction", "required_keys"):
                if edit.get(name):
                    out.print(
                        f"  {name} ({edit['operator']} on {edit['node']}): {edit[name]!r}", markup=False
                    )
        out.print(
            f"verification  {check['pairs']} paired replays, {check['counterexamples']} counterexamples; "
            f"target mode {check['target_before']:.3f} -> {check['target_after']:.3f} "
            f"(McNemar p={check['target_p']:.2g}); "
            f"expected failure mass {check['efm_before']:.3f} -> {check['efm_after']:.3f} "
            f"(95% CI of the change {check['efm_change_low']:+.3f} .. {check['efm_change_high']:+.3f})"
        )
        out.print(
            f"cost          {cost['llm_calls']} LLM calls, {cost['tokens']} tokens, {cost['wall_s']:.1f} s"
        )
        out.print(
            f"replayed      {len(rationale['counterexamples'])} counterexamples, "
            f"e.g. {', '.join(rationale['counterexamples'][:3])}"
        )
    out.print("operations:")
    out.print_json(json.dumps(patch["operations"]))


@patches.command()
def diff(
    workflow: Annotated[str, typer.Argument(help="Workflow id.")],
    version: Annotated[
        str | None, typer.Argument(help="The patch's new version (default: the latest).")
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="The base spec (file or example); default: the registered one.")
    ] = None,
) -> None:
    """The patch as a unified diff of the base spec's canonical JSON and the patched one."""
    import difflib

    from cegraph.daemon.cli.common import open_store
    from cegraph.daemon.workflows.registry import PatchError, WorkflowRegistry, apply_patch
    from cegraph.schemas.patch import WorkflowPatch

    patch = WorkflowPatch.model_validate(_find(workflow, version)["patch"])
    if base is not None:
        spec = load_spec(base)
    else:
        store = open_store(settings_or_exit(), read_only=True)
        try:
            spec = WorkflowRegistry(store).get(patch.workflow_id, patch.base_version).spec
        finally:
            store.close()
    try:
        patched = apply_patch(spec, patch)
    except PatchError as error:
        fail(str(error))
    before = json.dumps(spec.canonical(), indent=2, sort_keys=True).splitlines()
    after = json.dumps(patched.canonical(), indent=2, sort_keys=True).splitlines()
    lines = difflib.unified_diff(
        before, after, f"{spec.id}@{spec.version}", f"{patched.id}@{patched.version}", lineterm=""
    )
    out.print("\n".join(lines), markup=False, highlight=False)


@patches.command()
def verify(
    file: Annotated[Path, typer.Argument(help="The patch, as published on the patches topic (JSON).")],
    base: Annotated[str, typer.Option(help="The spec it applies to: a JSON file or an example name.")],
) -> None:
    """Check a patch's signature (with CEGRAPH_PUBLISHER__SIGNING_KEY) and that applying it to BASE
    gives a valid spec with the announced version and content hash. Exit 1 when anything fails."""
    from pydantic import ValidationError

    from cegraph.daemon.refine.signing import verify_signature
    from cegraph.daemon.workflows.registry import PatchError, apply_patch
    from cegraph.schemas.patch import WorkflowPatch

    settings = settings_or_exit()
    if settings.publisher.signing_key is None:
        fail("no signing key to verify with: set CEGRAPH_PUBLISHER__SIGNING_KEY")
    try:
        patch = WorkflowPatch.model_validate_json(file.read_bytes())
    except (OSError, ValidationError) as error:
        fail(f"{file} is not a workflow patch: {error}")
    if not verify_signature(patch, settings.publisher.signing_key.get_secret_value()):
        fail(f"{file}: the signature does not match the patch (altered, or signed with another key)")
    try:
        spec = apply_patch(load_spec(base), patch)
    except PatchError as error:
        fail(f"{file}: {error}")
    out.print(f"ok: {patch.workflow_id} {patch.base_version} -> {spec.version}, {spec.content_hash}")
    out.print("the signature is valid and the patch gives the spec it announces")
