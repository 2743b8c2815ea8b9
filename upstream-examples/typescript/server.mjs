// Example MCP upstream on the TypeScript SDK (@modelcontextprotocol/sdk 1.32.2)
// for Ratatosk tests. Streamable HTTP at /mcp, 2025 protocol eras only
// (the SDK does not speak 2026-07-28).
//
//   node server.mjs --port 9001 [--host 127.0.0.1] [--stateful]
//
// Default: stateless (sessionIdGenerator undefined, a new McpServer and
// transport for every HTTP request). --stateful: sessions with the SDK's own
// Mcp-Session-Id, one transport + McpServer kept per session, so that
// server->client requests (roots/list, elicitation/create) get their answers.
//
// Plain HTTP: GET /debug/headers, GET /debug/events (see README.md).
// stdout: one line `READY typescript url=http://HOST:PORT/mcp pid=N` once
// listening. Logs: stderr. Exit code 2 if the port is busy.

import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { parseArgs } from 'node:util';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { isInitializeRequest, ListRootsResultSchema } from '@modelcontextprotocol/sdk/types.js';
import { z } from 'zod';

const MCP_PATH = '/mcp';
const SEEN_MAX = 200;
const EVENTS_MAX = 500;
const MAX_BODY = 4 * 1024 * 1024;

const { values: opts } = parseArgs({
    options: {
        port: { type: 'string' },
        host: { type: 'string', default: '127.0.0.1' },
        stateful: { type: 'boolean', default: false }
    },
    strict: true
});
if (!opts.port || !/^\d+$/.test(opts.port)) {
    process.stderr.write('usage: server.mjs --port N [--host 127.0.0.1] [--stateful]\n');
    process.exit(64);
}
const PORT = Number(opts.port);
const HOST = opts.host;
const STATEFUL = opts.stateful;

function log(level, msg) {
    process.stderr.write(`${new Date().toISOString()} [ts:${PORT}] ${level} ${msg}\n`);
}

// ---------------------------------------------------------------------------
// Debug records

/** Headers of the last SEEN_MAX requests to /mcp, oldest first (lowercase names, repeats joined with ", "). */
const seenHeaders = [];
/** Last EVENTS_MAX sleep_then_return events. */
const events = [];

function recordHeaders(req) {
    const entry = {};
    const raw = req.rawHeaders;
    for (let i = 0; i + 1 < raw.length; i += 2) {
        const name = raw[i].toLowerCase();
        entry[name] = name in entry ? `${entry[name]}, ${raw[i + 1]}` : raw[i + 1];
    }
    seenHeaders.push(entry);
    if (seenHeaders.length > SEEN_MAX) seenHeaders.splice(0, seenHeaders.length - SEEN_MAX);
}

function recordEvent(tag, event) {
    events.push({ tag, event, at: Date.now() / 1000 });
    if (events.length > EVENTS_MAX) events.splice(0, events.length - EVENTS_MAX);
    log('INFO', `sleep_then_return tag=${JSON.stringify(tag)} ${event}`);
}

// ---------------------------------------------------------------------------
// Tools

const CONFIRM_SCHEMA = {
    type: 'object',
    properties: { confirmed: { type: 'boolean', title: 'Confirmed' } },
    required: ['confirmed']
};

/** Resolves after ms, or rejects with the signal's reason once it aborts. */
function sleep(ms, signal) {
    return new Promise((resolve, reject) => {
        if (signal.aborted) return reject(signal.reason ?? new Error('aborted'));
        const onAbort = () => {
            clearTimeout(timer);
            reject(signal.reason ?? new Error('aborted'));
        };
        const timer = setTimeout(() => {
            signal.removeEventListener('abort', onAbort);
            resolve();
        }, ms);
        signal.addEventListener('abort', onAbort, { once: true });
    });
}

function text(t) {
    return { content: [{ type: 'text', text: t }] };
}

function statelessBackChannelError(tool, method) {
    return new Error(
        `${tool}: this server runs stateless, so it cannot receive the client's answer to a ` +
            `server->client ${method} request; start the TypeScript example with --stateful`
    );
}

function createServer() {
    const server = new McpServer({ name: 'ratatosk-example-typescript', version: '0.0.0' });

    server.registerTool(
        'add',
        { description: 'Return a + b.', inputSchema: { a: z.number(), b: z.number() } },
        async ({ a, b }) => text(String(a + b))
    );

    server.registerTool(
        'slow_count',
        {
            description: 'Send n progress notifications about 100 ms apart, then return "counted to n".',
            inputSchema: { n: z.number().int() }
        },
        async ({ n }, extra) => {
            if (n < 0 || n > 10000) throw new Error('n must be between 0 and 10000');
            const token = extra._meta?.progressToken;
            for (let i = 1; i <= n; i++) {
                await sleep(100, extra.signal);
                if (token !== undefined) {
                    await extra.sendNotification({
                        method: 'notifications/progress',
                        params: { progressToken: token, progress: i, total: n }
                    });
                }
            }
            return text(`counted to ${n}`);
        }
    );

    server.registerTool(
        'ask_roots',
        { description: "Ask the client for its roots; returns {\"roots\":[uri,...]} in the client's order." },
        async extra => {
            if (!STATEFUL) throw statelessBackChannelError('ask_roots', 'roots/list');
            if (!server.server.getClientCapabilities()?.roots) {
                throw new Error('ask_roots: the client did not declare the roots capability');
            }
            const res = await extra.sendRequest({ method: 'roots/list' }, ListRootsResultSchema);
            return text(JSON.stringify({ roots: res.roots.map(r => r.uri) }));
        }
    );

    server.registerTool(
        'confirm',
        {
            description: 'Ask the user a yes/no question (form elicitation).',
            inputSchema: { question: z.string() }
        },
        async ({ question }, extra) => {
            if (!STATEFUL) throw statelessBackChannelError('confirm', 'elicitation/create');
            const res = await server.server.elicitInput(
                { mode: 'form', message: question, requestedSchema: CONFIRM_SCHEMA },
                { relatedRequestId: extra.requestId, signal: extra.signal }
            );
            if (res.action === 'accept') {
                const confirmed = res.content?.confirmed;
                if (typeof confirmed !== 'boolean') {
                    throw new Error(`confirm: accepted without a boolean 'confirmed' (content=${JSON.stringify(res.content)})`);
                }
                return text(JSON.stringify({ action: 'accept', confirmed }));
            }
            return text(JSON.stringify({ action: res.action }));
        }
    );

    server.registerTool(
        'sleep_then_return',
        {
            description: 'Sleep for `seconds`, recording started/finished/cancelled events under `tag`.',
            inputSchema: { seconds: z.number().min(0), tag: z.string().default('') }
        },
        async ({ seconds, tag }, extra) => {
            recordEvent(tag, 'started');
            try {
                await sleep(seconds * 1000, extra.signal);
            } catch (err) {
                recordEvent(tag, 'cancelled');
                throw err;
            }
            recordEvent(tag, 'finished');
            return text(`slept ${seconds}`);
        }
    );

    return server;
}

// ---------------------------------------------------------------------------
// HTTP plumbing

function sendJson(res, status, body, headers = {}) {
    const data = JSON.stringify(body);
    res.writeHead(status, { 'Content-Type': 'application/json', ...headers });
    res.end(data);
}

function jsonRpcError(res, status, code, message, headers = {}) {
    sendJson(res, status, { jsonrpc: '2.0', error: { code, message }, id: null }, headers);
}

/** Reads the whole body; null if it is larger than MAX_BODY. */
function readBody(req) {
    return new Promise((resolve, reject) => {
        const chunks = [];
        let size = 0;
        let tooLarge = false;
        req.on('data', c => {
            size += c.length;
            if (size > MAX_BODY) tooLarge = true;
            else chunks.push(c);
        });
        req.on('end', () => resolve(tooLarge ? null : Buffer.concat(chunks)));
        req.on('error', reject);
    });
}

function tryParse(buf) {
    try {
        return JSON.parse(buf.toString('utf8'));
    } catch {
        return undefined;
    }
}

// Stateless cancellation. Each POST has its own McpServer, so a POSTed
// notifications/cancelled cannot reach the request it names through the SDK.
// In-flight stateless requests are therefore registered here by JSON-RPC id,
// scoped by the gateway's Ratatosk-Session header ("" without one), and a
// notifications/cancelled closes the matching per-request server, which aborts
// the handler's extra.signal. A client disconnect does the same (see below).
const inflight = new Map(); // key -> Set<() => void>

function inflightKey(req, id) {
    return `${req.headers['ratatosk-session'] ?? ''}\u0000${JSON.stringify(id)}`;
}

const TOO_LARGE = Symbol('too large');

// Reads a POST body (413 when over MAX_BODY) and hands it to the SDK, which
// parses and validates it itself (@hono/node-server reads rawBody). Returns
// the parsed JSON (undefined if it is not JSON), or TOO_LARGE once answered.
async function takeBody(req, res) {
    const body = await readBody(req);
    if (body === null) {
        jsonRpcError(res, 413, -32000, `Payload too large (max ${MAX_BODY} bytes)`);
        return TOO_LARGE;
    }
    req.rawBody = body;
    return tryParse(body);
}

async function handleStateless(req, res) {
    if (req.method !== 'POST') {
        // As in the SDK's stateless example: no standalone stream, no session to delete.
        jsonRpcError(res, 405, -32000, 'Method not allowed.', { Allow: 'POST' });
        return;
    }
    const parsed = await takeBody(req, res);
    if (parsed === TOO_LARGE) return;
    const messages = Array.isArray(parsed) ? parsed : parsed && typeof parsed === 'object' ? [parsed] : [];

    for (const m of messages) {
        if (m && m.method === 'notifications/cancelled' && m.params && 'requestId' in m.params) {
            const set = inflight.get(inflightKey(req, m.params.requestId));
            log('INFO', `notifications/cancelled for id=${JSON.stringify(m.params.requestId)} (${set ? set.size : 0} in flight)`);
            if (set) for (const cancel of [...set]) cancel();
        }
    }

    const server = createServer();
    const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
    let closed = false;
    const close = () => {
        if (closed) return;
        closed = true;
        transport.close().catch(() => {});
        server.close().catch(() => {});
    };
    const keys = [];
    for (const m of messages) {
        if (m && typeof m.method === 'string' && m.id !== undefined && m.id !== null) {
            const key = inflightKey(req, m.id);
            if (!inflight.has(key)) inflight.set(key, new Set());
            inflight.get(key).add(close);
            keys.push(key);
        }
    }
    // Fires when the response has been sent or the client went away. Either
    // way nothing more can be delivered: close the per-request server, which
    // aborts a still-running handler.
    res.on('close', () => {
        for (const key of keys) {
            const set = inflight.get(key);
            if (set) {
                set.delete(close);
                if (set.size === 0) inflight.delete(key);
            }
        }
        close();
    });
    await server.connect(transport);
    await transport.handleRequest(req, res);
}

/** sessionId -> transport (stateful mode). */
const sessions = new Map();

async function handleStateful(req, res) {
    const sid = req.headers['mcp-session-id'];
    if (sid !== undefined) {
        const transport = sessions.get(sid);
        if (!transport) {
            jsonRpcError(res, 404, -32001, 'Session not found');
            return;
        }
        await transport.handleRequest(req, res);
        return;
    }
    if (req.method !== 'POST') {
        jsonRpcError(res, 400, -32000, 'Bad Request: Mcp-Session-Id header is required');
        return;
    }
    const parsed = await takeBody(req, res);
    if (parsed === TOO_LARGE) return;
    const isInit = Array.isArray(parsed) ? parsed.some(isInitializeRequest) : isInitializeRequest(parsed);
    if (!isInit) {
        if (parsed === undefined) jsonRpcError(res, 400, -32700, 'Parse error: Invalid JSON');
        else jsonRpcError(res, 400, -32000, 'Bad Request: Mcp-Session-Id header is required');
        return;
    }
    const server = createServer();
    const transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        onsessioninitialized: id => {
            sessions.set(id, transport);
            log('INFO', `session ${id} opened (${sessions.size} open)`);
        },
        onsessionclosed: id => {
            log('INFO', `session ${id} closed by DELETE`);
        }
    });
    transport.onclose = () => {
        const id = transport.sessionId;
        if (id && sessions.get(id) === transport) {
            sessions.delete(id);
            log('INFO', `session ${id} removed (${sessions.size} open)`);
        }
        server.close().catch(() => {});
    };
    await server.connect(transport);
    await transport.handleRequest(req, res);
}

const httpServer = http.createServer(async (req, res) => {
    try {
        const path = new URL(req.url ?? '/', 'http://x').pathname;
        if (path === '/debug/headers' && req.method === 'GET') return sendJson(res, 200, seenHeaders);
        if (path === '/debug/events' && req.method === 'GET') return sendJson(res, 200, events);
        if (path !== MCP_PATH) return sendJson(res, 404, { error: 'not found' });
        recordHeaders(req);
        if (STATEFUL) await handleStateful(req, res);
        else await handleStateless(req, res);
    } catch (err) {
        log('ERROR', `request failed: ${err?.stack ?? err}`);
        if (!res.headersSent) jsonRpcError(res, 500, -32603, 'Internal server error');
        else res.destroy();
    }
});
// Long SSE streams and slow tools: no server-side request timeout.
httpServer.requestTimeout = 0;

httpServer.on('error', err => {
    if (err.code === 'EADDRINUSE' || err.code === 'EACCES' || err.code === 'EADDRNOTAVAIL') {
        log('ERROR', `cannot bind ${HOST}:${PORT}: ${err.message}`);
        process.exit(2);
    }
    log('ERROR', `server error: ${err.stack ?? err}`);
    process.exit(1);
});

httpServer.listen(PORT, HOST, () => {
    const hostForUrl = HOST.includes(':') ? `[${HOST}]` : HOST;
    log('INFO', `listening on ${hostForUrl}:${PORT}${MCP_PATH} (${STATEFUL ? 'stateful' : 'stateless'})`);
    process.stdout.write(`READY typescript url=http://${hostForUrl}:${PORT}${MCP_PATH} pid=${process.pid}\n`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => {
        log('INFO', `${sig}: shutting down`);
        for (const t of sessions.values()) t.close().catch(() => {});
        httpServer.close();
        httpServer.closeAllConnections?.();
        process.exit(0);
    });
}
