"""A person at Keycloak's login page, for MCP clients that log in with the
authorization code flow (PKCE) and hand the user a URL to open.

`Person.redirect_handler` and `Person.callback_handler` plug into the
official Python SDK's `OAuthClientProvider`: instead of a browser, the
person fetches the authorization URL over HTTP, fills in the pages Keycloak
shows (identifier-first login: username, then password; the consent screen
of a client that registered itself; the organization picker), and follows
the redirects until Keycloak sends the user agent to the client's
redirect URI, whose `code`, `state` and `iss` are the callback. Nothing
listens on the redirect URI: its URL is read, not fetched, as a browser
hands it to a native client.

Every page is parsed from Keycloak's real HTML; a page the person does not
recognise fails the test with its text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html import unescape
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

from contextlib import asynccontextmanager

import anyio
import httpx2
from mcp import ClientSession, types
from mcp.client.auth import OAuthClientProvider
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata

from harness import free_port


@dataclass
class Form:
    action: str
    hidden: dict[str, str] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    # name -> values of buttons (the organization picker has one per org)
    buttons: dict[str, list[str]] = field(default_factory=dict)


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(action=a.get("action", "")))
        elif self.forms and tag in ("input", "button") and a.get("name"):
            form = self.forms[-1]
            form.names.add(a["name"])
            if tag == "input" and a.get("type") == "hidden":
                form.hidden[a["name"]] = a.get("value", "")
            if tag == "button":
                form.buttons.setdefault(a["name"], []).append(a.get("value", ""))


def visible_text(html: str) -> str:
    """A page's words without markup, scripts and styles: what a person reads."""
    html = re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", html)
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


class Person:
    """One user with one user agent (one cookie jar: Keycloak's SSO session
    lasts across logins, as in a browser)."""

    def __init__(self, username: str, password: str, redirect_uri: str, *,
                 organization: str | None = None, timeout: float = 30.0):
        self.username = username
        self.password = password
        self.redirect_uri = redirect_uri
        self.organization = organization  # the org to pick when Keycloak asks
        self.timeout = timeout
        self.agent = httpx2.AsyncClient(follow_redirects=False, timeout=10)
        self.cookies: dict[str, str] = {}
        self.pages: list[str] = []        # what the person saw, in order
        self.authorization_urls: list[str] = []
        self._result: AuthorizationCodeResult | None = None

    async def aclose(self) -> None:
        await self.agent.aclose()

    async def redirect_handler(self, url: str) -> None:
        self._result = None
        self.authorization_urls.append(url)
        with anyio.fail_after(self.timeout):
            r = await self._request("GET", url)
            for _ in range(20):
                if r.is_redirect:
                    location = str(r.url.join(r.headers["location"]))
                    if location.startswith(self.redirect_uri):
                        query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
                        if "error" in query:
                            raise AssertionError(f"Keycloak refused the authorization: {query}")
                        self._result = AuthorizationCodeResult(
                            code=query["code"], state=query.get("state"), iss=query.get("iss"))
                        return
                    r = await self._request("GET", location)
                    continue
                r = await self._fill(r)
            raise AssertionError(f"no redirect to the client after 20 pages: {self.pages}")

    async def callback_handler(self) -> AuthorizationCodeResult:
        assert self._result is not None, "the authorization did not come back to the client"
        return self._result

    async def _fill(self, page: httpx2.Response) -> httpx2.Response:
        if page.status_code != 200:
            raise AssertionError(f"Keycloak answered {page.status_code} at {page.url} after {self.pages}: "
                                 f"{visible_text(page.text)[:800]}")
        parser = _Forms()
        parser.feed(page.text)
        form = next((f for f in parser.forms if "/login-actions/" in f.action), None)
        if form is None:
            raise AssertionError(f"no login form on the page at {page.url}: {page.text[:800]}")
        data = dict(form.hidden)
        if "username" in form.names and "password" not in form.names:
            self.pages.append("username")
            data["username"] = self.username
        elif "password" in form.names:
            self.pages.append("password")
            data["password"] = self.password
            if "username" in form.names:
                data["username"] = self.username
        elif "accept" in form.names:
            self.pages.append("consent")
            data["accept"] = "Yes"
        elif "kc.org" in form.names:
            self.pages.append("organization")
            choices = form.buttons.get("kc.org", [])
            if self.organization not in choices:
                raise AssertionError(f"asked to pick an org among {choices}, to pick {self.organization!r}")
            data["kc.org"] = self.organization
        else:
            raise AssertionError(f"an unknown form ({sorted(form.names)}) at {page.url}: {page.text[:800]}")
        return await self._request("POST", str(page.url.join(form.action)), data=data)

    async def _request(self, method: str, url: str, **kw) -> httpx2.Response:
        """One request as a browser sends it to a loopback origin. Keycloak's
        login cookies are `Secure`, which browsers keep on http://127.0.0.1
        (a potentially trustworthy origin) and Python's cookie jar drops, so
        the person keeps them. Every request goes to the realm's one origin."""
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())} if self.cookies else {}
        r = await self.agent.request(method, url, headers=headers, **kw)
        for cookie in r.headers.get_list("set-cookie"):
            name, _, rest = cookie.partition("=")
            value = rest.split(";", 1)[0]
            attributes = rest.lower()
            if "max-age=0" in attributes or "expires=thu, 01 jan 1970" in attributes:
                self.cookies.pop(name.strip(), None)
            else:
                self.cookies[name.strip()] = value
        return r


class MemoryStorage:
    """The SDK's TokenStorage, in memory; shared by providers of one client."""

    def __init__(self, client_info=None):
        self.tokens = None
        self.client_info = client_info

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens) -> None:
        self.tokens = tokens

    async def get_client_info(self):
        return self.client_info

    async def set_client_info(self, client_info) -> None:
        self.client_info = client_info


# ----- the official SDK client, logging in as a person ------------------------------

def redirect_uri() -> str:
    # Nothing listens there: the person reads the code off the redirect.
    return f"http://127.0.0.1:{free_port()}/callback"


def provider(url: str, person: Person, storage: MemoryStorage, **kw) -> OAuthClientProvider:
    return OAuthClientProvider(
        server_url=url,
        client_metadata=OAuthClientMetadata(client_name="Ratatosk e2e client", redirect_uris=[person.redirect_uri]),
        storage=storage, redirect_handler=person.redirect_handler, callback_handler=person.callback_handler, **kw)


@asynccontextmanager
async def connected(url: str, auth: OAuthClientProvider, name: str, **callbacks):
    """An initialized session over the transport the URL names."""
    info = types.Implementation(name=name, version="1")
    if url.endswith("/sse"):
        transport = sse_client(url, auth=auth, timeout=10.0, sse_read_timeout=60.0)
    else:
        http = httpx2.AsyncClient(auth=auth, timeout=httpx2.Timeout(30.0, read=60.0))
        transport = streamable_http_client(url, http_client=http)
    async with transport as (read, write):
        async with ClientSession(read, write, read_timeout_seconds=30, client_info=info, **callbacks) as session:
            with anyio.fail_after(60):
                await session.initialize()
            yield session
