"""`temper distil --status` / `--cancel`: the batches of a state file, at the vendor.

Separate from `providers.batch` (which runs them) because it is a different job: a short
look at, or a cancel of, what a run (perhaps still going, in another process) submitted.
The endpoint passes the same privacy check and key lookup as a run (`open_provider`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .base import ProviderConfig
from .batch import State, state_path
from .batch_wire import wire_for


def _each_batch(cfg: ProviderConfig, act: str) -> list[dict[str, Any]]:
    """Every batch of the state file, polled (or cancelled) at the vendor, as table rows."""
    from .vendors import open_provider

    provider = open_provider(cfg)
    wire = wire_for(cfg.kind)
    state = State(state_path(cfg, provider.base_url), cfg, provider.base_url)

    async def main() -> list[dict[str, Any]]:
        client = provider._client()
        rows = []
        try:
            for b in state.batches:
                if b["id"] and not b["collected"]:
                    if act == "cancel":
                        b["cancel_requested"] = True
                        b["status"] = await wire.cancel(client, b["id"])
                    else:
                        pr = await wire.progress(client, b["id"])
                        b["status"], b["counts"] = pr.status, pr.counts
                rows.append(
                    {
                        "id": b["id"] or "(submission not recorded)",
                        "status": "collected" if b["collected"] else b["status"],
                        "requests": b["n"],
                        "counts": b["counts"],
                        "submitted": time.strftime(
                            "%Y-%m-%d %H:%M:%S", time.gmtime(b["submitted_at"])
                        ),
                    }
                )
        finally:
            await client.close()
        return rows

    try:
        rows = asyncio.run(main())
        state.save()
    finally:
        provider.close()
    return rows


def batch_status(cfg: ProviderConfig) -> list[dict[str, Any]]:
    """Each batch of the state file with its progress at the vendor (collected ones as such)."""
    return _each_batch(cfg, "status")


def cancel_batches(cfg: ProviderConfig) -> list[dict[str, Any]]:
    """Cancel every batch still running. What they finished is collected by the next run;
    what they did not is submitted again by it (a cancel is not counted as an attempt)."""
    return _each_batch(cfg, "cancel")
