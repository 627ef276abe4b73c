"""The audit log's hash chain: each entry's hash covers its fields and the previous hash.

Changing, deleting or reordering a committed entry breaks the chain from
that entry on; ``estkit audit verify`` names the first broken one.
"""

from __future__ import annotations

import hashlib
import json

from estkit.store.models import AuditEvent

GENESIS = "0" * 64


def entry_hash(prev_hash: str, event: AuditEvent, entry_id: int) -> str:
    canonical = json.dumps(
        [
            entry_id,
            event.at.isoformat(timespec="microseconds"),
            event.actor,
            event.action,
            event.outcome,
            event.device_id,
            event.serial,
            event.detail,
        ],
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(f"{prev_hash}\n{canonical}".encode()).hexdigest()
