// Small TS-SDK client (@modelcontextprotocol/sdk 1.32.2) for Ratatosk tests.
//
//   node client.mjs URL [--header 'Name: value']... [--timeout-ms 15000]
//
// Connects with StreamableHTTPClientTransport (initialize handshake, 2025
// eras), declares the roots capability and answers roots/list with
// file:///tmp/ts-root, then calls add(2, 3) and ask_roots. Prints ONE JSON
// line on stdout:
//
//   {"ok":true,"protocol_version":"2025-11-25","session_id":null,
//    "add":"5","add_is_error":false,
//    "ask_roots":"{\"roots\":[\"file:///tmp/ts-root\"]}","ask_roots_is_error":false,
//    "roots_requests":1}
//
// or {"ok":false,"error":"..."} and exit code 1 if connecting or a call failed
// at the protocol level. A tool error (isError) is reported, not fatal.
// Run ./setup first (or use it through ./run's node_modules).

import { parseArgs } from 'node:util';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { ListRootsRequestSchema } from '@modelcontextprotocol/sdk/types.js';

const ROOT_URI = 'file:///tmp/ts-root';

const { values: opts, positionals } = parseArgs({
    allowPositionals: true,
    options: {
        header: { type: 'string', multiple: true, default: [] },
        'timeout-ms': { type: 'string', default: '15000' }
    },
    strict: true
});
if (positionals.length !== 1) {
    process.stderr.write("usage: client.mjs URL [--header 'Name: value']... [--timeout-ms N]\n");
    process.exit(64);
}
const url = new URL(positionals[0]);
const timeout = Number(opts['timeout-ms']);
const headers = {};
for (const h of opts.header) {
    const i = h.indexOf(':');
    if (i <= 0) {
        process.stderr.write(`bad --header ${JSON.stringify(h)} (want Name:value)\n`);
        process.exit(64);
    }
    headers[h.slice(0, i).trim()] = h.slice(i + 1).trim();
}

function firstText(result) {
    const c = (result.content ?? []).find(x => x.type === 'text');
    return c ? c.text : null;
}

const out = { ok: false };
let rootsRequests = 0;
const client = new Client({ name: 'ratatosk-ts-client', version: '0.0.0' }, { capabilities: { roots: { listChanged: false } } });
client.setRequestHandler(ListRootsRequestSchema, async () => {
    rootsRequests += 1;
    return { roots: [{ uri: ROOT_URI, name: 'ts-root' }] };
});
const transport = new StreamableHTTPClientTransport(url, { requestInit: { headers } });

try {
    await client.connect(transport, { timeout });
    out.protocol_version = transport.protocolVersion ?? null;
    out.session_id = transport.sessionId ?? null;
    const add = await client.callTool({ name: 'add', arguments: { a: 2, b: 3 } }, undefined, { timeout });
    out.add = firstText(add);
    out.add_is_error = add.isError === true;
    const roots = await client.callTool({ name: 'ask_roots', arguments: {} }, undefined, { timeout });
    out.ask_roots = firstText(roots);
    out.ask_roots_is_error = roots.isError === true;
    out.roots_requests = rootsRequests;
    out.ok = true;
} catch (err) {
    out.error = String(err?.message ?? err);
} finally {
    if (transport.sessionId) {
        try {
            await transport.terminateSession();
        } catch {
            // 405 (no session support) or already gone: nothing to do.
        }
    }
    await client.close().catch(() => {});
}
process.stdout.write(JSON.stringify(out) + '\n');
process.exit(out.ok ? 0 : 1);
