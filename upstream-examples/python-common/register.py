"""Registers a Python MCP server with a Ratatosk gateway, and keeps it
registered: `PUT /orgs/{org}/servers/{name}` on the gateway's admin
listener when the server starts, again every third of its `ttl`, and
`DELETE` when it stops. A server that dies without a word is dropped by
the gateway when its `ttl` runs out.

Standard library only (it runs in any venv). From the environment, with
`registration_from_env(url)` (which `example_http.serve` uses):

    RATATOSK_REGISTER_URL      the gateway's admin URL, e.g. http://10.0.0.2:9090;
                               several, comma-separated, are tried in turn
                               (nodes of one Redis-mode gateway share
                               registrations). Unset: no registration.
    RATATOSK_REGISTER_ORG      the org to join (it needs `registration`)
    RATATOSK_REGISTER_NAME     the server's name, its path segment and prefix
    RATATOSK_REGISTER_SECRET   the org's registration secret, or the admin one
    RATATOSK_REGISTER_TTL      seconds, default 30
    RATATOSK_REGISTER_ERA      default `auto` (the gateway probes it)
    RATATOSK_REGISTER_PREFIX   the prefix of its tools, default the name
    RATATOSK_REGISTER_ADVERTISE  the URL the gateway calls, default the
                               server's own (`http://host:port/mcp`)

Or in code:

    async with Registration(["http://gw:9090"], "team", "billing", secret,
                            "http://billing:8000/mcp"):
        await server.serve()
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger("register")

# Longest wait for one answer of the gateway.
HTTP_TIMEOUT_S = 5.0


class RegistrationRefused(Exception):
    """The gateway refused the registration (4xx): it says why."""


class Registration:
    """Keeps one server registered while it runs (an async context
    manager, or `start()` and `stop()`)."""

    def __init__(self, admin_urls: list[str], org: str, name: str, secret: str, url: str, *,
                 ttl: float = 30.0, era: str = "auto", prefix: str | None = None):
        if not admin_urls:
            raise ValueError("at least one admin URL of the gateway")
        self.admin_urls = [u.rstrip("/") for u in admin_urls]
        self.org, self.name, self.secret = org, name, secret
        self.ttl = ttl
        self.body: dict[str, Any] = {"upstream": {"era": era, "replicas": [url]}, "ttl": f"{ttl}s"}
        if prefix is not None:
            self.body["prefix"] = prefix
        self.endpoint: str | None = None
        self._task: asyncio.Task | None = None
        self._stopped = False

    def _path(self) -> str:
        return f"/orgs/{self.org}/servers/{self.name}"

    def _call(self, method: str, body: dict | None) -> dict:
        """One request, to the first admin URL that answers; blocking."""
        data = json.dumps(body).encode() if body is not None else None
        last: Exception | None = None
        for base in self.admin_urls:
            request = urllib.request.Request(base + self._path(), data=data, method=method, headers={
                "Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as answer:
                    text = answer.read()
                    return json.loads(text) if text else {}
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")
                try:
                    detail = json.loads(detail)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                if 400 <= e.code < 500 and e.code != 429:
                    raise RegistrationRefused(f"{method} {base}{self._path()}: {e.code}: {detail}") from None
                last = OSError(f"{base}: {e.code}: {detail}")
            except (OSError, ValueError) as e:
                last = OSError(f"{base}: {e}")
        raise OSError(f"no admin URL of the gateway answered: {last}")

    async def register(self) -> dict:
        """Registers (or renews) once; the gateway's answer."""
        answer = await asyncio.to_thread(self._call, "PUT", self.body)
        self.endpoint = answer.get("endpoint")
        return answer

    async def deregister(self) -> None:
        """Removes the registration; a registration already gone is fine."""
        try:
            await asyncio.to_thread(self._call, "DELETE", None)
        except RegistrationRefused as e:
            if ": 404:" not in str(e):
                raise

    async def _keep(self) -> None:
        every = max(self.ttl / 3, 0.5)
        failed = 0
        while True:
            try:
                answer = await self.register()
                if answer.get("result") != "renewed" or failed:
                    log.info("registered %s/%s (%s): %s", self.org, self.name, answer.get("result"), self.endpoint)
                failed = 0
                await asyncio.sleep(every)
            except RegistrationRefused as e:
                # Wrong config or secret: said loudly, tried again (a
                # reload of the gateway may fix it).
                log.error("registration refused: %s", e)
                await asyncio.sleep(every)
            except OSError as e:
                failed += 1
                log.warning("registration failed (%d in a row): %s", failed, e)
                await asyncio.sleep(min(0.25 * 2 ** failed, every))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._keep(), name=f"register {self.org}/{self.name}")

    async def stop(self) -> None:
        """Stops renewing and deregisters (best effort, bounded); once."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await asyncio.wait_for(self.deregister(), HTTP_TIMEOUT_S + 1)
            log.info("deregistered %s/%s", self.org, self.name)
        except (OSError, RegistrationRefused, asyncio.TimeoutError) as e:
            log.warning("deregistration failed (the registration expires by itself): %s", e)

    async def __aenter__(self) -> "Registration":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def registration_from_env(url: str) -> Registration | None:
    """The registration the environment asks for (see the module's doc),
    for a server at `url`; None without RATATOSK_REGISTER_URL."""
    admin = os.environ.get("RATATOSK_REGISTER_URL", "").strip()
    if not admin:
        return None
    missing = [v for v in ("RATATOSK_REGISTER_ORG", "RATATOSK_REGISTER_NAME", "RATATOSK_REGISTER_SECRET")
               if not os.environ.get(v)]
    if missing:
        raise SystemExit(f"RATATOSK_REGISTER_URL is set, but not {', '.join(missing)}")
    return Registration(
        [u.strip() for u in admin.split(",") if u.strip()],
        os.environ["RATATOSK_REGISTER_ORG"],
        os.environ["RATATOSK_REGISTER_NAME"],
        os.environ["RATATOSK_REGISTER_SECRET"],
        os.environ.get("RATATOSK_REGISTER_ADVERTISE") or url,
        ttl=float(os.environ.get("RATATOSK_REGISTER_TTL", "30")),
        era=os.environ.get("RATATOSK_REGISTER_ERA", "auto"),
        prefix=os.environ.get("RATATOSK_REGISTER_PREFIX"),
    )
