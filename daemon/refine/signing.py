"""Signatures of published patches: HMAC-SHA256 over the patch's canonical JSON.

The signed bytes are the patch without its `signature`, as sorted-key compact JSON, so any change to
an operation, a version, the hash or the rationale breaks the signature. The key comes from
`CEGRAPH_PUBLISHER__SIGNING_KEY`; consumers holding the same key check it with `verify_signature`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable

from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.workflow import canonical_json

SCHEME = "hmac-sha256"


def signed_bytes(patch: WorkflowPatch) -> bytes:
    return canonical_json(patch.model_dump(mode="json", by_alias=True, exclude={"signature"}))


def sign(patch: WorkflowPatch, key: str) -> WorkflowPatch:
    digest = hmac.new(key.encode(), signed_bytes(patch), hashlib.sha256).hexdigest()
    return patch.model_copy(update={"signature": f"{SCHEME}:{digest}"})


def verify_signature(patch: WorkflowPatch, key: str) -> bool:
    """True when the patch carries a valid signature made with `key`."""
    if not patch.signature or not patch.signature.startswith(f"{SCHEME}:"):
        return False
    expected = sign(patch, key).signature
    assert expected is not None
    return hmac.compare_digest(expected, patch.signature)


def signed_only(apply: Callable[[WorkflowPatch], bool], key: str) -> Callable[[WorkflowPatch], bool]:
    """`apply`, for patches whose signature verifies with `key`; others are refused with a warning."""

    def apply_if_signed(patch: WorkflowPatch) -> bool:
        if not verify_signature(patch, key):
            logging.getLogger("cegraph.signing").warning(
                "patch %s@%s refused: its signature does not verify with CEGRAPH_PUBLISHER__SIGNING_KEY",
                patch.workflow_id, patch.new_version,
            )  # fmt: skip
            return False
        return apply(patch)

    return apply_if_signed
