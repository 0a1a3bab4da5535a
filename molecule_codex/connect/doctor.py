"""``doctor``'s platform section: is the platform reachable, is the token accepted, which mode.

The platform has no register dry run, so the probe is one heartbeat (the same payload ``connect``
sends, with no turns running): it proves reachability and the token, and marks the workspace
online until the next ~3 minutes pass without a beat. Nothing is registered.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from molecule_codex.connect.heartbeat import heartbeat_payload
from molecule_codex.connect.platform import AuthRejected, PlatformClient, PlatformError, TokenError, resolve_token
from molecule_codex.connect.push import check_public_url


def _line(ok: bool, name: str, detail: str) -> str:
    return f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}"


async def platform_report(adapter: Any, env: Mapping[str, str]) -> tuple[list[str], bool]:
    """Report lines and whether every platform check passed."""
    url = env.get("PLATFORM_URL", "").rstrip("/")
    workspace = env.get("WORKSPACE_ID", "")
    if not workspace:
        return [_line(False, "platform", f"{url}: WORKSPACE_ID is not set")], False
    try:
        token = resolve_token(env)
    except TokenError as exc:
        return [_line(False, "platform token", str(exc))], False
    public = env.get("MOLECULE_CODEX_PUBLIC_URL")
    client = PlatformClient(url, workspace, token)
    try:
        await client.heartbeat(heartbeat_payload(adapter, None, time.monotonic()))
    except AuthRejected as exc:
        return [_line(True, "platform reachable", url),
                _line(False, "platform token", f"the token from {token.source} is refused (HTTP {exc.status})")], False
    except PlatformError as exc:
        return [_line(False, "platform reachable", f"{url}: {exc}")], False
    finally:
        await client.aclose()
    if public:
        reason = check_public_url(public)
        mode = _line(reason is None, "delivery mode", reason or f"push to {public} (MOLECULE_CODEX_PUBLIC_URL)")
    else:
        mode = _line(True, "delivery mode", "poll (connect without --public-url polls the activity feed)")
    lines = [_line(True, "platform reachable", url),
             _line(True, "platform token", f"accepted for workspace {workspace} (from {token.source})"), mode]
    return lines, all(line.startswith("[PASS]") for line in lines)
