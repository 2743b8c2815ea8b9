"""Redis without a single point of failure (issue 20): gateway nodes find
the primary through real redis-sentinel processes, or the primary of
their slot of a real Redis Cluster, and follow a failover. Under load (1,000 sessions, each with an
open stream, events published through both nodes) the primary is killed:
the sessions and their open streams survive, and what asynchronous
replication lost, or `sessions.wait` kept, is counted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time

import pytest

import rawhttp
from harness import PUBLISH_SECRET, Gateway, RedisCluster, Sentinels, org, raw_initialize, wait_until

pytestmark = pytest.mark.anyio

SESSIONS = 1000
BEFORE = 10  # events per session published before the primary dies
AFTER = 10  # events per session published after the nodes have followed


def ha_gateway(log_dir, replicas, group: Sentinels | RedisCluster, name: str, prefix: str,
               wait: dict | None = None) -> Gateway:
    topology = ({"sentinel": {"master_name": group.master_name, "nodes": group.nodes}}
                if isinstance(group, Sentinels) else {"cluster": {"nodes": group.nodes}})
    sessions = {"idle_ttl": "30m", "event_log_size": 256, "store": "redis", "key_prefix": prefix,
                "max_per_subject": 100_000, **topology}
    if wait:
        sessions["wait"] = wait
    return Gateway(log_dir, {"s25": org(replicas)}, name=name, extra={"sessions": sessions})


def note(n: int) -> dict:
    return {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": n}}


def offsets(group: Sentinels | RedisCluster) -> tuple[int, int]:
    """The primary's replication offset, and its replica's as last acknowledged."""
    info = dict(line.strip().split(":", 1) for line in group.primary.cli("INFO", "replication").splitlines()
                if ":" in line)
    fields = dict(f.split("=", 1) for f in info.get("slave0", "").split(",") if "=" in f)
    return int(info.get("master_repl_offset", "0")), int(fields.get("offset", "-1"))


def logged(group: Sentinels | RedisCluster, prefix: str, sids: list[str]) -> dict[str, list[int]]:
    """The event data in each session's shared log on the (new) primary."""
    out: dict[str, list[int]] = {}
    for sid in sids:
        lines = group.primary.cli("XRANGE", f"{prefix}e:{sid}:a", "-", "+").splitlines()
        out[sid] = [json.loads(line)["params"]["data"] for line in lines if line.startswith('{"jsonrpc"')]
    return out


async def failover_under_load(log_dir, replicas, name: str, wait: dict | None, cluster: bool = False) -> dict:
    group: Sentinels | RedisCluster
    if cluster:
        # Every key under one hash tag: one slot, served by one primary.
        group = RedisCluster(log_dir, tag=name, name=name).start_and_wait()
        prefix = "{" + name + "}:"
    else:
        # One replica: with `wait`, the one that confirmed is the one
        # promoted. The old primary comes back as the new one's replica.
        group = Sentinels(log_dir, name=name, replicas=1).start_and_wait()
        prefix = f"{name}:"
    gws = [ha_gateway(log_dir, replicas, group, f"{name}-{c}", prefix, wait) for c in "ab"]
    pools: list[rawhttp.Pool] = []
    try:
        for gw in gws:
            gw.start_and_wait()
            wait_until(f"{gw.name} ready on {name}", lambda gw=gw: gw.admin_get("/readyz").status_code == 200,
                       timeout=20)
        mcp = [rawhttp.Pool("127.0.0.1", gw.port, 16) for gw in gws]
        admin = [rawhttp.Pool("127.0.0.1", gw.admin_port, 32) for gw in gws]
        pools = mcp + admin
        json_headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        auth = {"Authorization": f"Bearer {PUBLISH_SECRET}", "Content-Type": "application/json"}
        path = gws[0].url("s25").removeprefix(gws[0].origin)
        rng = random.Random(20)

        async def open_session(i: int) -> str:
            return await raw_initialize(mcp[i % 2], path, f"fo-{i}")

        sids = await asyncio.gather(*(open_session(i) for i in range(SESSIONS)))
        probe = await open_session(SESSIONS)
        # The sessions themselves are on the replica before the load starts.
        written, _ = offsets(group)
        wait_until("the replica in sync with the sessions", lambda: offsets(group)[1] >= written, timeout=20)

        received: dict[str, list[int]] = {sid: [] for sid in sids}
        broken: dict[str, str] = {}
        attached = asyncio.Semaphore(0)

        async def read(i: int, sid: str) -> None:
            """One stream per session, on one node, open from start to end."""
            headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
            events = rawhttp.sse_messages("127.0.0.1", gws[i % 2].port, path, headers)
            attached.release()
            try:
                async with contextlib.aclosing(events):
                    async for _, message in events:
                        received[sid].append(message["params"]["data"])
            except Exception as e:  # noqa: BLE001 - recorded and asserted on
                broken[sid] = repr(e)
            else:
                broken[sid] = "the stream ended"

        # What one publish costs, alone: 200 in a row to one session.
        latencies: list[float] = []
        for n in range(200):
            started = time.monotonic()
            status, _, answer = await admin[n % 2].request(
                "POST", f"/sessions/{probe}/messages", auth, json.dumps(note(-1)).encode())
            latencies.append(time.monotonic() - started)
            assert status == 202, answer

        readers = [asyncio.create_task(read(i, sid)) for i, sid in enumerate(sids)]
        for _ in sids:
            await attached.acquire()

        acked: dict[str, list[int]] = {sid: [] for sid in sids}
        acked_after: dict[str, list[int]] = {sid: [] for sid in sids}
        refused = 0
        followed = asyncio.Event()

        async def publish(sid: str) -> None:
            nonlocal refused
            n = 0
            after = 0
            while n < BEFORE or after < AFTER:
                is_after = followed.is_set()
                try:
                    status, _, _ = await asyncio.wait_for(rng.choice(admin).request(
                        "POST", f"/sessions/{sid}/messages", auth, json.dumps(note(n)).encode()), timeout=15)
                except (TimeoutError, OSError, rawhttp.HttpError):
                    status = 0
                if status == 202:
                    acked[sid].append(n)
                    if is_after:
                        acked_after[sid].append(n)
                        after += 1
                else:
                    refused += 1
                    await asyncio.sleep(0.05)
                n += 1

        load_started = time.monotonic()
        rate = 0.0

        async def kill_when_loaded() -> float:
            nonlocal rate
            # Mid-load: a third of the sessions are past their first events.
            while (done := sum(len(a) for a in acked.values())) < SESSIONS * BEFORE // 3:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            rate = done / (started - load_started)
            new = await asyncio.to_thread(group.fail_over)

            def following() -> bool:
                for gw in gws:
                    r = gw.admin_get("/readyz")
                    if r.status_code != 200:
                        return False
                    if r.json()["events"].get("primary") != f"127.0.0.1:{new.port}":
                        return False
                return True

            await asyncio.to_thread(wait_until, "every node ready on the new primary", following, 30)
            took = time.monotonic() - started
            if wait and isinstance(group, Sentinels):
                # WAIT needs a replica again.
                await asyncio.to_thread(group.rejoin)
            followed.set()
            return took

        killer = asyncio.create_task(kill_when_loaded())
        await asyncio.wait_for(asyncio.gather(*(publish(sid) for sid in sids)), timeout=300)
        took = await killer

        def all_arrived() -> bool:
            return all(set(acked_after[sid]) <= set(received[sid]) for sid in sids)

        deadline = time.monotonic() + 30
        while not all_arrived() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        broken = {sid: why for sid, why in broken.items() if why != repr(asyncio.CancelledError())}

        log = logged(group, prefix, sids)
        lost_from_log = sum(len(set(acked[sid]) - set(log[sid])) for sid in sids)
        lost_live = sum(len(set(acked[sid]) - set(received[sid])) for sid in sids)
        lost_after = sum(len(set(acked_after[sid]) - set(received[sid])) for sid in sids)
        # Acknowledged events in order, and no event twice. An event whose
        # publish got 503 may still arrive (at least once), and with
        # `wait` it was seen to arrive after a later one (see README).
        out_of_order = [sid for sid in sids
                        if len(received[sid]) != len(set(received[sid]))
                        or [n for n in received[sid] if n in set(acked[sid])] != sorted(set(acked[sid]) & set(received[sid]))]

        # Every session still works, on either node.
        async def ping(i: int, sid: str) -> int:
            body = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "ping"}).encode()
            status, _, _ = await mcp[(i + 1) % 2].request(
                "POST", path, {**json_headers, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}, body)
            return status

        pings = await asyncio.gather(*(ping(i, sid) for i, sid in enumerate(sids)))
        result = {
            "acked": sum(len(a) for a in acked.values()), "refused": refused, "failover_s": took,
            "acked_after": sum(len(a) for a in acked_after.values()),
            "lost_from_log": lost_from_log, "lost_live": lost_live, "lost_after": lost_after,
            "broken": broken, "out_of_order": out_of_order,
            "first_out_of_order": (received[out_of_order[0]], acked[out_of_order[0]]) if out_of_order else None,
            "pings_failed": sum(1 for s in pings if s != 200),
            "publish_ms_median": statistics.median(latencies) * 1000, "rate": rate,
            "unreplicated": [gw.admin_get("/readyz").json()["events"].get("unreplicated") for gw in gws],
            "primaries": [gw.admin_get("/readyz").json()["events"].get("primary") for gw in gws],
            "new_primary": f"127.0.0.1:{group.primary.port}",
        }
        print(f"{name}: {result['acked']} events acknowledged, {refused} refused while the primary was away; "
              f"nodes ready on the new primary {took:.1f} s after the kill; lost from the log {lost_from_log}, "
              f"not seen by a live reader {lost_live}; one publish alone: median {result['publish_ms_median']:.2f} ms; "
              f"under load {rate:.0f} events/s acknowledged")
        for gw in gws:
            gw.assert_healthy()
        return result
    finally:
        for pool in pools:
            pool.close()
        for gw in gws:
            gw.stop()
        group.stop()


def assert_survived(result: dict) -> None:
    assert not result["broken"], f"{len(result['broken'])} open streams broke, e.g. {next(iter(result['broken'].items()))}"
    assert result["pings_failed"] == 0, f"{result['pings_failed']} sessions were lost"
    assert not result["out_of_order"], (f"{len(result['out_of_order'])} streams repeated or reordered events; "
                                        f"one got {result['first_out_of_order'][0]}, of which "
                                        f"{result['first_out_of_order'][1]} acknowledged")
    assert result["lost_after"] == 0, "events published after the failover did not all arrive"
    assert result["acked_after"] == SESSIONS * AFTER
    assert result["primaries"] == [result["new_primary"]] * 2, "/readyz names the primary each node follows"


async def test_a_failover_under_load_keeps_sessions_and_open_streams(log_dir, replicas):
    """Asynchronous replication: whatever the primary had not passed on when
    it died is gone (counted, not asserted: it depends on timing)."""
    result = await failover_under_load(log_dir, replicas, "fo-async", None)
    assert_survived(result)


async def test_with_wait_no_acknowledged_event_is_lost_in_a_failover(log_dir, replicas):
    """`sessions.wait: {replicas: 1}`: a 202 means the replica had it, so the
    promoted replica has every acknowledged event."""
    result = await failover_under_load(log_dir, replicas, "fo-wait", {"replicas": 1, "timeout": "1s"})
    assert_survived(result)
    assert result["lost_from_log"] == 0, f"{result['lost_from_log']} acknowledged events lost despite WAIT"
    assert result["lost_live"] == 0



async def test_a_cluster_failover_under_load_keeps_sessions_and_open_streams(log_dir, replicas):
    """Redis Cluster: the primary of the gateway's slot dies, its replica
    takes over, and every node follows."""
    result = await failover_under_load(log_dir, replicas, "fo-cluster", None, cluster=True)
    assert_survived(result)
