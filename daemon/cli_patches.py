"""`cegraph patches`: check a workflow patch before trusting it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cegraph.daemon.cli_common import fail, load_spec, out, settings_or_exit

patches = typer.Typer(name="patches", help="Versioned, signed workflow patches.", no_args_is_help=True)


@patches.command()
def verify(
    file: Annotated[Path, typer.Argument(help="The patch, as published on the patches topic (JSON).")],
    base: Annotated[str, typer.Option(help="The spec it applies to: a JSON file or an example name.")],
) -> None:
    """Check a patch's signature (with CEGRAPH_PUBLISHER__SIGNING_KEY) and that applying it to BASE
    gives a valid spec with the announced version and content hash. Exit 1 when anything fails."""
    from pydantic import ValidationError

    from cegraph.daemon.registry import PatchError, apply_patch
    from cegraph.daemon.signing import verify_signature
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
