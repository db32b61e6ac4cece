"""How the operators' commands (``links``, ``breaker``, ``saf``) call the gateway's admin
API: the base URL and one authenticated call, every failure one line and exit code 1."""

from __future__ import annotations

from typing import Any

from shared.cli.console import fail, load_settings


def admin_url(url: str | None) -> str:
    """``url`` without its trailing slash, or the gateway's HTTP port from the settings."""
    if url:
        return url.rstrip("/")
    s = load_settings()
    return f"http://{s.host}:{s.gateway_http_port}"


def admin_call(method: str, url: str, path: str, token: str | None = None) -> dict[str, Any]:
    """Call an admin endpoint with the operator token (``--token`` or the
    ``admin_token_operator`` setting); any failure is one clear line and exit code 1."""
    import httpx

    bearer = token or load_settings().admin_token_operator
    try:
        r = httpx.request(
            method, url + path, timeout=10, headers={"Authorization": f"Bearer {bearer}"}
        )
    except httpx.HTTPError as exc:
        fail(f"cannot reach {url} ({type(exc).__name__}); is the network running?")
    try:
        data: dict[str, Any] = r.json()
    except ValueError:
        fail(f"{url}{path} answered HTTP {r.status_code} without JSON")
    if r.status_code >= 400:
        fail(str(data.get("error", f"HTTP {r.status_code}")))
    return data
