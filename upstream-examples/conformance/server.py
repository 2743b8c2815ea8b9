"""Conformance fixture for Ratatosk tests, on mcp 2.3.0 (MCPServer).

Serves the tools, resources and prompts that the scenarios of the official MCP
conformance suite (npm `@modelcontextprotocol/conformance`) call, at /mcp on
one endpoint for both protocol eras:

- 2025 clients (`initialize`, `Mcp-Session-Id`): stateful sessions with an
  event store, so a closed request stream can be resumed with Last-Event-ID;
- 2026-07-28 clients (`MCP-Protocol-Version: 2026-07-28`, per-request `_meta`):
  the SDK's stateless modern path, with multi-round-trip input requests
  (`InputRequiredResult`), sealed `requestState` and `subscriptions/listen`.

Host and Origin are checked (DNS-rebinding protection): loopback names only.
Run it through ./run (which prepares the venv):

    ./run --port 9301 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import itertools
import json
import logging
import sys
import weakref
from pathlib import Path
from typing import Annotated, Any

import anyio
from mcp.server import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.prompts.base import Prompt, UserMessage
from mcp.server.request_state import RequestStateSecurity
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.server.elicitation import render_elicitation_schema
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp.types import (
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    AudioContent,
    Completion,
    CompletionArgument,
    CompletionContext,
    CreateMessageRequest,
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitResult,
    EmbeddedResource,
    EmptyResult,
    ImageContent,
    InputRequest,
    InputRequiredResult,
    JSONRPCMessage,
    ListRootsRequest,
    ListRootsResult,
    PromptReference,
    ResourceTemplateReference,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    TextResourceContents,
    UnsubscribeRequestParams,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field, ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python-common"))
from example_http import MCP_PATH, configure_logging, serve  # noqa: E402

NAME = "conformance"
# A fixed key keeps sealed requestState valid across restarts of the fixture
# (and across replicas, should a test start several).
STATE_KEY = b"ratatosk-conformance-fixture-request-state-key"
# How long a 2025 client waits before it reconnects to a closed SSE stream.
RETRY_MS = 200
# Longest wait to hand one session a list_changed notification.
NOTIFY_TIMEOUT_S = 2

log = logging.getLogger("upstream")

# A 1x1 PNG and a minimal WAV, base64 (what the scenarios compare against).
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
WAV_B64 = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="


class BoundedEventStore(EventStore):
    """The last MAX_EVENTS SSE events of all streams, for Last-Event-ID replay.

    Event ids are `<stream>/<n>` with one counter for the process, so replay
    finds the stream from the id alone.
    """

    MAX_EVENTS = 10_000

    def __init__(self) -> None:
        self._events: collections.OrderedDict[str, tuple[str, JSONRPCMessage | None]] = collections.OrderedDict()
        self._counter = itertools.count(1)

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = f"{stream_id}/{next(self._counter)}"
        self._events[event_id] = (stream_id, message)
        while len(self._events) > self.MAX_EVENTS:
            self._events.popitem(last=False)
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        if last_event_id not in self._events:
            return None
        stream_id = self._events[last_event_id][0]
        after = False
        for event_id, (sid, message) in list(self._events.items()):
            if after and sid == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
            after = after or event_id == last_event_id
        return stream_id


mcp = MCPServer(
    "mcp-conformance-test-server",
    version="1.0.0",
    request_state_security=RequestStateSecurity(keys=[STATE_KEY], audience="mcp-conformance-test-server"),
)

# URIs a 2025 session subscribed to (resources/subscribe); kept for the log only.
SUBSCRIBED: set[str] = set()


def _form(message: str, properties: dict[str, Any], required: list[str]) -> ElicitRequest:
    schema = {"type": "object", "properties": properties, "required": required}
    return ElicitRequest(params=ElicitRequestFormParams(message=message, requested_schema=schema))


def _model_form(message: str, model: type[BaseModel]) -> ElicitRequest:
    return ElicitRequest(params=ElicitRequestFormParams(message=message, requested_schema=render_elicitation_schema(model)))


def _sampling(text: str, max_tokens: int) -> CreateMessageRequest:
    message = SamplingMessage(role="user", content=TextContent(type="text", text=text))
    return CreateMessageRequest(params=CreateMessageRequestParams(messages=[message], max_tokens=max_tokens))


# What each kind of question is answered with.
ANSWER_TYPES: dict[str, type[BaseModel]] = {
    "elicitation/create": ElicitResult,
    "sampling/createMessage": CreateMessageResult,
    "roots/list": ListRootsResult,
}


def _is_modern(ctx: Context) -> bool:
    return ctx.protocol_version in MODERN_PROTOCOL_VERSIONS


def _typed(request: InputRequest, answer: Any) -> Any:
    """`answer` as the result model of `request`'s method, or None if it is not one."""
    model = ANSWER_TYPES[request.method]
    if isinstance(answer, model):
        return answer
    try:
        raw = answer.model_dump(by_alias=True, exclude_none=True) if isinstance(answer, BaseModel) else answer
        return model.model_validate(raw)
    except ValidationError:
        return None


async def _ask_now(ctx: Context, request: InputRequest) -> Any:
    """Asks a 2025 session's client on the call's own SSE stream and waits for the answer."""
    related = ServerMessageMetadata(related_request_id=ctx.request_context.request_id)
    return await ctx.session.send_request(request, ANSWER_TYPES[request.method], metadata=related)


async def _ask(
    ctx: Context, requests: dict[str, InputRequest], state: str | None = None
) -> dict[str, Any] | InputRequiredResult:
    """The client's answers to `requests`, asked the way the request's era allows.

    2026-07-28: the answers come with the client's retry (`inputResponses`), so
    the first call returns an InputRequiredResult carrying `state`; a retry that
    lacks a usable answer, or echoes another state, is asked again. 2025
    sessions: each question goes to the client on the call's stream, in order.
    """
    if not _is_modern(ctx):
        return {key: await _ask_now(ctx, request) for key, request in requests.items()}
    given = ctx.input_responses or {}
    answers = {key: _typed(request, given.get(key)) for key, request in requests.items()}
    if ctx.request_state == state and all(answer is not None for answer in answers.values()):
        return answers
    return InputRequiredResult(input_requests=requests, request_state=state)


def _elicited(answer: Any, field: str) -> Any:
    """`content[field]` of an accepted elicitation answer, else None."""
    if isinstance(answer, ElicitResult) and answer.content:
        return answer.content.get(field)
    return None


def _sampled(answer: Any) -> str | None:
    """The text of a sampling answer, else None."""
    if isinstance(answer, CreateMessageResult) and getattr(answer.content, "type", None) == "text":
        return answer.content.text
    return None


def _form_outcome(answer: ElicitResult, model: type[BaseModel]) -> str:
    """`action=..., content=...` of an elicitation answer, its content checked against `model`."""
    content = model.model_validate(answer.content or {}).model_dump_json() if answer.action == "accept" else "{}"
    return f"action={answer.action}, content={content}"


# ---- tools: content types ----------------------------------------------------


@mcp.tool()
def test_simple_text() -> str:
    """Returns one text block."""
    return "This is a simple text response for testing."


@mcp.tool()
def test_image_content() -> list[ImageContent]:
    """Returns one image block (1x1 PNG)."""
    return [ImageContent(type="image", data=PNG_B64, mime_type="image/png")]


@mcp.tool()
def test_audio_content() -> list[AudioContent]:
    """Returns one audio block (minimal WAV)."""
    return [AudioContent(type="audio", data=WAV_B64, mime_type="audio/wav")]


@mcp.tool()
def test_embedded_resource() -> list[EmbeddedResource]:
    """Returns one embedded text resource."""
    resource = TextResourceContents(
        uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
    )
    return [EmbeddedResource(type="resource", resource=resource)]


@mcp.tool()
def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
    """Returns a text, an image and an embedded JSON resource."""
    resource = TextResourceContents(
        uri="test://mixed-content-resource",
        mime_type="application/json",
        text=json.dumps({"test": "data", "value": 123}),
    )
    return [
        TextContent(type="text", text="Multiple content types test:"),
        ImageContent(type="image", data=PNG_B64, mime_type="image/png"),
        EmbeddedResource(type="resource", resource=resource),
    ]


@mcp.tool()
def test_error_handling() -> str:
    """Always fails: the result carries isError."""
    raise RuntimeError("This tool intentionally returns an error for testing")


# ---- tools: notifications while running ------------------------------------


@mcp.tool()
async def test_tool_with_logging(ctx: Context) -> str:
    """Sends three notifications/message (info) before answering."""
    for i, text in enumerate(("Tool execution started", "Tool processing data", "Tool execution completed")):
        if i:
            await asyncio.sleep(0.05)
        await ctx.info(text)
    return "Tool with logging executed successfully"


@mcp.tool()
async def test_tool_with_progress(ctx: Context) -> str:
    """Reports progress 0, 50 and 100 of 100, then returns the progress token."""
    for i, step in enumerate((0, 50, 100)):
        if i:
            await asyncio.sleep(0.05)
        await ctx.report_progress(progress=step, total=100, message=f"Completed step {step} of 100")
    meta = ctx.request_context.meta
    token = meta.get("progress_token") if meta else None
    return str(token if token is not None else 0)


@mcp.tool()
async def test_reconnection(ctx: Context) -> str:
    """Closes the request's SSE stream mid-call; the answer reaches the client once it resumes."""
    await ctx.info("Before disconnect")
    await ctx.close_sse_stream()
    await asyncio.sleep(0.3)
    await ctx.info("After reconnect")
    return "Reconnection test completed successfully. If you received this, the client properly reconnected."


# ---- tools: questions to the client ------------------------------------------
# 2025 sessions ask on the call's stream; 2026-07-28 requests answer with an
# InputRequiredResult and get the answers with the retry (see _ask).


@mcp.tool()
async def test_sampling(prompt: str, ctx: Context) -> str | InputRequiredResult:
    """Asks the client for an LLM completion (sampling/createMessage)."""
    try:
        answers = await _ask(ctx, {"sampling": _sampling(prompt, 100)})
    except Exception as exc:  # noqa: BLE001 (the client's refusal is the answer)
        return f"Sampling not supported or error: {exc}"
    if isinstance(answers, InputRequiredResult):
        return answers
    return f"LLM response: {_sampled(answers['sampling']) or 'No response'}"


class UserResponse(BaseModel):
    response: str = Field(description="User's response")


class DefaultsForm(BaseModel):
    """Every primitive type with a default (SEP-1034)."""

    name: str = Field(default="John Doe", description="User name")
    age: int = Field(default=30, description="User age")
    score: float = Field(default=95.5, description="User score")
    status: str = Field(
        default="active", description="User status", json_schema_extra={"enum": ["active", "inactive", "pending"]}
    )
    verified: bool = Field(default=True, description="Verification status")


class EnumsForm(BaseModel):
    """The five enum shapes of SEP-1330."""

    untitledSingle: str = Field(
        description="Select one option", json_schema_extra={"enum": ["option1", "option2", "option3"]}
    )
    titledSingle: str = Field(
        description="Select one option with titles",
        json_schema_extra={
            "oneOf": [
                {"const": "value1", "title": "First Option"},
                {"const": "value2", "title": "Second Option"},
                {"const": "value3", "title": "Third Option"},
            ]
        },
    )
    legacyEnum: str = Field(
        description="Select one option (legacy)",
        json_schema_extra={"enum": ["opt1", "opt2", "opt3"], "enumNames": ["Option One", "Option Two", "Option Three"]},
    )
    untitledMulti: list[str] = Field(
        description="Select multiple options",
        json_schema_extra={
            "minItems": 1,
            "maxItems": 3,
            "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
        },
    )
    titledMulti: list[str] = Field(
        description="Select multiple options with titles",
        json_schema_extra={
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "anyOf": [
                    {"const": "value1", "title": "First Choice"},
                    {"const": "value2", "title": "Second Choice"},
                    {"const": "value3", "title": "Third Choice"},
                ]
            },
        },
    )


async def _form_tool(ctx: Context, message: str, model: type[BaseModel], prefix: str) -> str | InputRequiredResult:
    try:
        answers = await _ask(ctx, {"form": _model_form(message, model)})
        if isinstance(answers, InputRequiredResult):
            return answers
        return f"{prefix}: {_form_outcome(answers['form'], model)}"
    except Exception as exc:  # noqa: BLE001
        return f"Elicitation not supported or error: {exc}"


@mcp.tool()
async def test_elicitation(message: str, ctx: Context) -> str | InputRequiredResult:
    """Asks the client for user input (elicitation/create, form)."""
    return await _form_tool(ctx, message, UserResponse, "User response")


@mcp.tool()
async def test_elicitation_sep1034_defaults(ctx: Context) -> str | InputRequiredResult:
    """Elicitation whose schema gives a default for every primitive type."""
    message = "Please review and update the form fields with defaults"
    return await _form_tool(ctx, message, DefaultsForm, "Elicitation completed")


@mcp.tool()
async def test_elicitation_sep1330_enums(ctx: Context) -> str | InputRequiredResult:
    """Elicitation with every enum shape (titled/untitled, single/multi, legacy enumNames)."""
    message = "Please select options from the enum fields"
    return await _form_tool(ctx, message, EnumsForm, "Elicitation completed")


@mcp.tool()
async def test_missing_capability(ctx: Context) -> str:
    """Needs the client's sampling capability: without it, a -32021 error (not a tool error)."""
    caps = ctx.client_capabilities
    if caps is None or caps.sampling is None:
        raise MCPError(
            code=MISSING_REQUIRED_CLIENT_CAPABILITY,
            message="Client did not declare the sampling capability",
            data={"requiredCapabilities": {"sampling": {}}},
        )
    return "Success"


@mcp.tool()
async def test_input_required_result_elicitation(ctx: Context) -> str | InputRequiredResult:
    """Asks for a name (elicitation), then greets it."""
    answers = await _ask(ctx, {"user_name": _form("What is your name?", {"name": {"type": "string"}}, ["name"])})
    if isinstance(answers, InputRequiredResult):
        return answers
    return f"Hello, {_elicited(answers['user_name'], 'name') or 'unknown'}!"


@mcp.tool()
async def test_input_required_result_sampling(ctx: Context) -> str | InputRequiredResult:
    """Asks for a completion (sampling), then quotes it."""
    answers = await _ask(ctx, {"capital_question": _sampling("What is the capital of France?", 100)})
    if isinstance(answers, InputRequiredResult):
        return answers
    return f"Sampling result: {_sampled(answers['capital_question']) or 'no response'}"


@mcp.tool()
async def test_input_required_result_list_roots(ctx: Context) -> str | InputRequiredResult:
    """Asks for the client's roots, then counts them."""
    answers = await _ask(ctx, {"client_roots": ListRootsRequest()})
    if isinstance(answers, InputRequiredResult):
        return answers
    return f"Found {len(answers['client_roots'].roots)} root(s)"


@mcp.tool()
async def test_input_required_result_request_state(ctx: Context) -> str | InputRequiredResult:
    """Asks for a confirmation with requestState, which the retry must echo."""
    ask = _form("Please confirm", {"ok": {"type": "boolean"}}, ["ok"])
    answers = await _ask(ctx, {"confirm": ask}, state="request-state")
    if isinstance(answers, InputRequiredResult):
        return answers
    return f"state-ok: requestState validated (ok={_elicited(answers['confirm'], 'ok')})"


@mcp.tool()
async def test_input_required_result_multiple_inputs(ctx: Context) -> str | InputRequiredResult:
    """Asks for an elicitation, a sampling and the roots at once."""
    answers = await _ask(
        ctx,
        {
            "user_name": _form("What is your name?", {"name": {"type": "string"}}, ["name"]),
            "greeting": _sampling("Generate a greeting", 50),
            "client_roots": ListRootsRequest(),
        },
        state="multiple-inputs",
    )
    if isinstance(answers, InputRequiredResult):
        return answers
    name = _elicited(answers["user_name"], "name") or "unknown"
    greeting = _sampled(answers["greeting"]) or "Hello there!"
    return f"Name: {name}; Greeting: {greeting}; Roots: {len(answers['client_roots'].roots)}"


@mcp.tool()
async def test_input_required_result_multi_round(ctx: Context) -> str | InputRequiredResult:
    """Two questions in two rounds; requestState carries the first answer into the second."""
    step1 = _form("Step 1: What is your name?", {"name": {"type": "string"}}, ["name"])
    step2 = _form("Step 2: What is your favorite color?", {"color": {"type": "string"}}, ["color"])
    if not _is_modern(ctx):
        name = _elicited(await _ask_now(ctx, step1), "name")
        color = _elicited(await _ask_now(ctx, step2), "color")
        return f"Multi-round complete for {name} who likes {color}"
    state = json.loads(ctx.request_state) if ctx.request_state else {}
    given = ctx.input_responses or {}
    if state.get("round") == 1 and (answer := _typed(step1, given.get("step1"))) is not None:
        round2 = json.dumps({"round": 2, "name": _elicited(answer, "name")})
        return InputRequiredResult(input_requests={"step2": step2}, request_state=round2)
    if state.get("round") == 2 and (answer := _typed(step2, given.get("step2"))) is not None:
        return f"Multi-round complete for {state.get('name')} who likes {_elicited(answer, 'color')}"
    return InputRequiredResult(input_requests={"step1": step1}, request_state=json.dumps({"round": 1}))


@mcp.tool()
async def test_input_required_result_tampered_state(ctx: Context) -> str | InputRequiredResult:
    """Hands out sealed requestState: a tampered echo is refused by the SDK before this runs."""
    answers = await _ask(ctx, {"confirm": _form("Please confirm", {"ok": {"type": "boolean"}}, ["ok"])}, "tamper-test")
    if isinstance(answers, InputRequiredResult):
        return answers
    return "integrity-ok: state verified"


@mcp.tool()
async def test_input_required_result_capabilities(ctx: Context) -> str | InputRequiredResult:
    """Asks only for what the client declared (elicitation and/or sampling)."""
    caps = ctx.client_capabilities
    requests: dict[str, InputRequest] = {}
    if caps is not None and caps.elicitation is not None:
        requests["elicit_input"] = _form("Elicitation input", {"value": {"type": "string"}}, ["value"])
    if caps is not None and caps.sampling is not None:
        requests["sample_input"] = _sampling("Sample request", 50)
    if not requests:
        return "No supported capabilities declared"
    answers = await _ask(ctx, requests, state="capabilities-test")
    if isinstance(answers, InputRequiredResult):
        return answers
    return f"capabilities-ok: received {','.join(sorted(answers))}"



# ---- tools: list changes, custom headers, JSON Schema 2020-12 ---------------


def _placeholder() -> str:
    """Added and removed again by the trigger tools."""
    return "dynamic"


# Open 2025 sessions, for list_changed notifications on their GET streams
# (2026-07-28 clients learn of changes through subscriptions/listen instead).
SESSIONS: weakref.WeakSet[Any] = weakref.WeakSet()


async def _remember_session(ctx: ServerRequestContext, call_next: Any) -> Any:
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        SESSIONS.add(ctx.session)
    return await call_next(ctx)


async def _tell_sessions(what: str) -> None:
    sessions = list(SESSIONS)
    for session in sessions:
        try:
            with anyio.fail_after(NOTIFY_TIMEOUT_S):
                if what == "tools":
                    await session.send_tool_list_changed()
                else:
                    await session.send_prompt_list_changed()
        except Exception as exc:  # noqa: BLE001 (a closed or stuck session just misses it)
            log.info("%s list_changed not delivered to a session: %r", what, exc)
    log.info("%s list_changed sent to %d 2025 sessions", what, len(sessions))


@mcp.tool()
async def test_trigger_tool_change(ctx: Context) -> str:
    """Changes the tool list and says so: on subscriptions/listen streams that asked, and to 2025 sessions."""
    mcp.add_tool(_placeholder, name="test_dynamic_tool")
    mcp.remove_tool("test_dynamic_tool")
    await ctx.notify_tools_changed()
    await _tell_sessions("tools")
    return "Mutation triggered"


@mcp.tool()
async def test_trigger_prompt_change(ctx: Context) -> str:
    """Changes the prompt list and says so: on subscriptions/listen streams that asked, and to 2025 sessions."""
    mcp.add_prompt(Prompt.from_function(_placeholder, name="test_dynamic_prompt", description="dynamic"))
    mcp.remove_prompt("test_dynamic_prompt")
    await ctx.notify_prompts_changed()
    await _tell_sessions("prompts")
    return "Mutation triggered"


@mcp.tool()
def test_x_mcp_header(
    region: Annotated[
        str, Field(description="Mirrored into the Mcp-Param-Region header", json_schema_extra={"x-mcp-header": "Region"})
    ] = "<none>",
) -> str:
    """Has an argument mirrored into a header (x-mcp-header), for Mcp-Param-* validation."""
    return f"region={region}"


JSON_SCHEMA_2020_12: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "$anchor": "addressDef",
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {
        "name": {"type": "string"},
        "address": {"$ref": "#/$defs/address"},
        "contactMethod": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}


@mcp.tool(name="json_schema_2020_12_tool")
def json_schema_2020_12_tool(**arguments: Any) -> str:
    """Its inputSchema uses JSON Schema 2020-12 keywords ($schema, $defs, $anchor, if/then/else, ...)."""
    return f"JSON Schema 2020-12 tool called with: {json.dumps(arguments)}"


# MCPServer derives inputSchema from the signature; this tool publishes a
# hand-written one, which the SDK also validates calls against.
mcp._tool_manager.get_tool("json_schema_2020_12_tool").parameters = JSON_SCHEMA_2020_12  # noqa: SLF001


# ---- resources ---------------------------------------------------------------


@mcp.resource("test://static-text", name="static-text", title="Static Text Resource", mime_type="text/plain")
def static_text() -> str:
    """A static text resource for testing"""
    return "This is the content of the static text resource."


@mcp.resource("test://static-binary", name="static-binary", title="Static Binary Resource", mime_type="image/png")
def static_binary() -> bytes:
    """A static binary resource (image) for testing"""
    return base64.b64decode(PNG_B64)


@mcp.resource("test://template/{id}/data", name="template", title="Resource Template", mime_type="application/json")
def template_data(id: str) -> str:  # noqa: A002 (the template variable's name)
    """A resource template with parameter substitution"""
    return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})


@mcp.resource("test://watched-resource", name="watched-resource", title="Watched Resource", mime_type="text/plain")
def watched_resource() -> str:
    """A resource clients may subscribe to"""
    return "Watched resource content"


# ---- prompts -----------------------------------------------------------------


@mcp.prompt(title="Simple Test Prompt")
def test_simple_prompt() -> list[UserMessage]:
    """A simple prompt without arguments"""
    return [UserMessage(role="user", content=TextContent(type="text", text="This is a simple prompt for testing."))]


@mcp.prompt(title="Prompt With Arguments")
def test_prompt_with_arguments(
    arg1: Annotated[str, Field(description="First test argument")],
    arg2: Annotated[str, Field(description="Second test argument")],
) -> list[UserMessage]:
    """A prompt with required arguments"""
    text = f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"
    return [UserMessage(role="user", content=TextContent(type="text", text=text))]


@mcp.prompt(title="Prompt With Embedded Resource")
def test_prompt_with_embedded_resource(
    resourceUri: Annotated[str, Field(description="URI of the resource to embed")],  # noqa: N803 (wire name)
) -> list[UserMessage]:
    """A prompt that includes an embedded resource"""
    resource = TextResourceContents(uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing.")
    return [
        UserMessage(role="user", content=EmbeddedResource(type="resource", resource=resource)),
        UserMessage(role="user", content=TextContent(type="text", text="Please process the embedded resource above.")),
    ]


@mcp.prompt(title="Prompt With Image")
def test_prompt_with_image() -> list[UserMessage]:
    """A prompt that includes image content"""
    return [
        UserMessage(role="user", content=ImageContent(type="image", data=PNG_B64, mime_type="image/png")),
        UserMessage(role="user", content=TextContent(type="text", text="Please analyze the image above.")),
    ]


@mcp.prompt()
async def test_input_required_result_prompt(ctx: Context) -> list[UserMessage] | InputRequiredResult:
    """A prompt that first asks the client for context (elicitation)"""
    ask = _form("What context should the prompt use?", {"context": {"type": "string"}}, ["context"])
    answers = await _ask(ctx, {"user_context": ask})
    if isinstance(answers, InputRequiredResult):
        return answers
    text = f"Prompt with context: {_elicited(answers['user_context'], 'context') or 'unknown'}"
    return [UserMessage(role="user", content=TextContent(type="text", text=text))]


# ---- completion, logging level, subscriptions (2025 sessions) ---------------


@mcp.completion()
async def complete(
    ref: PromptReference | ResourceTemplateReference, argument: CompletionArgument, context: CompletionContext | None
) -> Completion:
    """No suggestions: an empty, complete list."""
    return Completion(values=[], total=0, has_more=False)


async def set_level(ctx: ServerRequestContext, params: SetLevelRequestParams) -> EmptyResult:
    log.info("log level set to %s", params.level)
    return EmptyResult()


async def subscribe(ctx: ServerRequestContext, params: SubscribeRequestParams) -> EmptyResult:
    SUBSCRIBED.add(str(params.uri))
    log.info("subscribed to %s", params.uri)
    return EmptyResult()


async def unsubscribe(ctx: ServerRequestContext, params: UnsubscribeRequestParams) -> EmptyResult:
    SUBSCRIBED.discard(str(params.uri))
    log.info("unsubscribed from %s", params.uri)
    return EmptyResult()


lowlevel = mcp._lowlevel_server  # noqa: SLF001 (MCPServer has no public hook for these three)
lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)
lowlevel.middleware.append(_remember_session)
# 2025 sessions get list_changed notifications too (see _tell_sessions), so their
# initialize result says so; the SDK declares them only when told.
_sdk_initialization_options = lowlevel.create_initialization_options


def _initialization_options(notification_options: NotificationOptions | None = None, *args: Any, **kwargs: Any) -> Any:
    every_list = NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True)
    return _sdk_initialization_options(notification_options or every_list, *args, **kwargs)


lowlevel.create_initialization_options = _initialization_options


async def _serve(host: str, port: int) -> None:
    loopback = ["127.0.0.1", "localhost", "[::1]"]
    app = mcp.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=False,
        json_response=False,
        event_store=BoundedEventStore(),
        retry_interval=RETRY_MS,
        transport_security=TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[f"{h}:*" for h in loopback],
            allowed_origins=[f"http://{h}:*" for h in loopback],
        ),
    )
    await serve(app, host, port, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    configure_logging(NAME, args.port)
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
