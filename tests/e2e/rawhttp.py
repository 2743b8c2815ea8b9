"""A small asyncio HTTP/1.1 client for load tests: keep-alive requests and SSE
streams, without a general client's per-request cost, so that one Python
process can drive several gateway nodes at thousands of requests per second."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator


class HttpError(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise HttpError(f"not an HTTP status line: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            chunk = await reader.readexactly(size + 2)
            yield chunk[:-2]
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length:
            yield await reader.readexactly(length)
    else:
        while chunk := await reader.read(65536):
            yield chunk


def _request_bytes(method: str, host: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Conn:
    """One keep-alive connection."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(_request_bytes(method, f"{self.host}:{self.port}", path, headers or {}, body))
        status, head = await _read_head(self.reader)
        data = b"".join([c async for c in _body_chunks(self.reader, head)])
        if head.get("connection", "").lower() == "close":
            self.close()
        return status, head, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None


class Pool:
    """Keep-alive connections to one address, shared by many tasks."""

    def __init__(self, host: str, port: int, size: int):
        self.idle: asyncio.Queue[Conn] = asyncio.Queue()
        for _ in range(size):
            self.idle.put_nowait(Conn(host, port))

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        conn = await self.idle.get()
        try:
            return await conn.request(method, path, headers, body)
        except BaseException:
            conn.close()
            raise
        finally:
            self.idle.put_nowait(conn)

    def close(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait().close()


async def sse_messages(host: str, port: int, path: str,
                       headers: dict[str, str]) -> AsyncIterator[tuple[str | None, dict]]:
    """Opens an SSE stream and yields (event id, JSON message) for each event
    with data; the connection closes when the caller stops iterating."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_request_bytes("GET", f"{host}:{port}", path, headers, b""))
        status, head = await _read_head(reader)
        if status != 200:
            body = b"".join([c async for c in _body_chunks(reader, head)])
            raise HttpError(f"GET {path}: HTTP {status}: {body[:300]!r}")
        buf = b""
        ev_id: str | None = None
        data: list[str] = []
        async for chunk in _body_chunks(reader, head):
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.rstrip(b"\r").decode()
                if line == "":
                    if data and "".join(data).strip():
                        yield ev_id, json.loads("\n".join(data))
                    data = []
                elif line.startswith("id:"):
                    ev_id = line[3:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
    finally:
        writer.close()
