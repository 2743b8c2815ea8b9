"""OpenAPI-backed servers (issue 21): a real REST API (FastAPI,
upstream-examples/python-openapi, which publishes its own /openapi.json)
behind the gateway as an `openapi` server. The official SDK client lists
and calls its tools on the org's federated endpoint and on the server's
own, and gets precise errors for invalid arguments and for the API's
4xx/5xx answers; the API gets the server's credential."""

from __future__ import annotations

import httpx2
import pytest
from mcp.shared.exceptions import MCPError

from harness import Example, Gateway, running, started, streamable_session

pytestmark = pytest.mark.anyio

# LOCAL-ONLY test key of the example API, given to both through the environment.
ITEMS_KEY = "items-local-only-key"


@pytest.fixture(scope="module")
def rest_api(log_dir):
    with started(Example("python-openapi", log_dir, env={"EXAMPLE_API_KEY": ITEMS_KEY})) as api:
        yield api


@pytest.fixture(scope="module")
def openapi_gateway(log_dir, rest_api):
    def items(auth: dict | None) -> dict:
        server = {"spec": f"{rest_api.base}/openapi.json", "timeout": "5s",
                  "operations": ["listItems", "getItem", "createItem", "fail*"]}
        if auth:
            server["auth"] = auth
        return {"openapi": server}
    orgs = {
        "shop": {"auth": "none", "servers": {"items": items(
            {"mode": "static", "header": "X-API-Key", "value": "${E2E_ITEMS_KEY}"})}},
        "nokey": {"auth": "none", "servers": {"items": items(None)}},
    }
    gw = Gateway(log_dir / "openapi", orgs, name="openapi", env={"E2E_ITEMS_KEY": ITEMS_KEY})
    with running(gw):
        yield gw


def text_of(result) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


async def test_the_sdk_client_lists_and_calls_the_apis_operations(openapi_gateway, rest_api):
    gw = openapi_gateway
    async with streamable_session(gw.url("shop")) as s:
        tools = {t.name: t for t in (await s.list_tools()).tools}
        # The allow-list: deleteItem is not served.
        assert set(tools) == {"items__listItems", "items__getItem", "items__createItem", "items__failAlways"}, tools
        create = tools["items__createItem"]
        assert create.input_schema["required"] == ["body"], create.input_schema
        assert create.input_schema["properties"]["body"]["$ref"] == "#/$defs/NewItem"
        assert "price" in create.input_schema["$defs"]["NewItem"]["properties"]
        assert create.output_schema["type"] == "object" and "price" in create.output_schema["properties"]
        assert tools["items__getItem"].annotations.read_only_hint is True
        # The API's key is the gateway's business, not an argument.
        assert not any(k.lower() == "x-api-key" for k in tools["items__listItems"].input_schema["properties"])

        got = await s.call_tool("items__getItem", {"item_id": 1})
        assert not got.is_error, got
        assert got.structured_content == {"id": 1, "name": "hammer", "price": 12.5, "tags": ["tools"]}
        made = await s.call_tool("items__createItem", {"body": {"name": "saw", "price": 3}})
        assert not made.is_error and made.structured_content["name"] == "saw", made
        listed = await s.call_tool("items__listItems", {"limit": 5})
        names = [i["name"] for i in listed.structured_content["result"]]
        assert names[:1] == ["hammer"] and "saw" in names, listed.structured_content

        # Invalid arguments: refused before the API, naming the argument.
        bad = await s.call_tool("items__getItem", {"item_id": "one"})
        assert bad.is_error and "`item_id`: expected integer, got a string" in text_of(bad), bad
        bad = await s.call_tool("items__getItem", {"item_id": 1, "colour": "red"})
        assert bad.is_error and "unknown argument `colour`" in text_of(bad), bad
        # The API's own refusals, with what it said.
        missing = await s.call_tool("items__getItem", {"item_id": 999})
        assert missing.is_error and "HTTP 404 Not Found to GET /items/{item_id}" in text_of(missing), missing
        assert "no item 999" in text_of(missing)
        invalid = await s.call_tool("items__createItem", {"body": {"name": "", "price": -1}})
        assert invalid.is_error and "HTTP 422" in text_of(invalid) and "price" in text_of(invalid), invalid
        failed = await s.call_tool("items__failAlways", {})
        assert failed.is_error and "HTTP 500" in text_of(failed), failed
        # What is not served is no tool at all.
        with pytest.raises(MCPError, match="unknown tool 'deleteItem'"):
            await s.call_tool("items__deleteItem", {"item_id": 1})

    # The API got the server's key, and no client token.
    seen = httpx2.get(f"{rest_api.base}/debug/headers", timeout=5).json()
    assert seen and all(h.get("x-api-key") == ITEMS_KEY for h in seen[-3:]), seen[-3:]
    assert not any("authorization" in h for h in seen)

    # The server's own endpoint: the same tools, unprefixed.
    async with streamable_session(gw.url("shop/items")) as s:
        names = {t.name for t in (await s.list_tools()).tools}
        assert names == {"listItems", "getItem", "createItem", "failAlways"}, names
        got = await s.call_tool("getItem", {"item_id": 1})
        assert got.structured_content["name"] == "hammer", got


async def test_an_api_that_refuses_the_gateway_says_so(openapi_gateway):
    # `nokey` sends no key: the API answers 401, and the tool error says it.
    async with streamable_session(openapi_gateway.url("nokey")) as s:
        refused = await s.call_tool("items__getItem", {"item_id": 1})
        assert refused.is_error, refused
        assert "HTTP 401 Unauthorized" in text_of(refused) and "X-API-Key" in text_of(refused), refused
