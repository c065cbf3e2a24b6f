"""Schema-v1 export messages for the QoS service's tests and benchmark, built from
``iqn_qos.synth`` (so the faulty component is known) and published with nats-py
into a real JetStream, the way an agent's export does (``Nats-Msg-Id`` = the id)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iqn_qos.mle import slot_of
from iqn_qos.synth import iter_slots, topology_json

STREAM = "IQN"
SUBJECTS = ["iqn.stalls.*", "iqn.sessions.*"]


def scenario(workdir: Path, name: str = "relay-bug", *, slots: int = 2, lines_per_slot: int = 1500,
             components: int = 600, seed: int = 3, slot_s: int = 900, routers: int = 2,
             t0: float | None = None) -> tuple[Path, list[dict[str, Any]], set[str]]:
    """(topology file, session messages, injected component ids) of a synthetic scenario."""
    kw: dict[str, Any] = {} if t0 is None else {"t0": t0}
    world, _faults, it = iter_slots(name, slots=slots, slot_s=slot_s, lines_per_slot=lines_per_slot,
                                    components=components, seed=seed, addresses=True, **kw)
    msgs: list[dict[str, Any]] = []
    injected: set[str] = set()
    for s in it:
        injected |= set(s.injected)
        for i, ln in enumerate(s.lines):
            router = f"r{i % routers}"
            msgs.append(session(router, len(msgs), ln.client or "", ln.server or "", slot_of(ln.t, slot_s),
                                slot_s, float(ln.n), float(ln.n - ln.m)))
    topo = workdir / "topology.json"
    topo.write_text(json.dumps(topology_json(world)))
    return topo, msgs, injected


def session(router: str, row: int, client: str, server: str, slot: float, slot_s: float, watched: float,
            stalled: float, history: str = "h0") -> dict[str, Any]:
    return {"v": 1, "type": "session", "id": f"{router}/{history}/session/{row}", "router": router,
            "interface": "eth0", "client.address": client, "server.address": server, "iqn.slot": slot,
            "iqn.slot_s": slot_s, "iqn.watched_s": watched, "iqn.stalled_s": stalled,
            "iqn.recorded_at": time.time()}


def stall(router: str, row: int, client: str, server: str, start: float, end: float) -> dict[str, Any]:
    return {"v": 1, "type": "stall", "id": f"{router}/h0/stall/{row}", "router": router, "interface": "eth0",
            "client.address": client, "client.port": 40000, "server.address": server, "server.port": 443,
            "iqn.flow": f"{server}:443>{client}:40000", "iqn.start": start, "iqn.end": end,
            "iqn.duration_s": end - start, "iqn.candidates": 8, "iqn.estimator": "count",
            "iqn.truncated": False, "iqn.state": "ended", "iqn.detected_at": end + 0.2}


def subject(msg: dict[str, Any]) -> str:
    return f"iqn.{'sessions' if msg['type'] == 'session' else 'stalls'}.{msg['router']}"


async def publish(urls: Sequence[str], msgs: Sequence[dict[str, Any] | bytes], *, window: int = 2000,
                  raw_subject: str = "iqn.sessions.r0") -> None:
    """Publish every message until JetStream acknowledges it (same ``Nats-Msg-Id`` on a retry),
    creating stream IQN if it is missing."""
    import nats
    import nats.errors
    import nats.js.errors

    nc = await nats.connect(servers=list(urls), connect_timeout=5)
    try:
        js = nc.jetstream()
        for _ in range(100):
            try:
                try:
                    await js.stream_info(STREAM)
                except nats.js.errors.NotFoundError:
                    await js.add_stream(name=STREAM, subjects=SUBJECTS)
                break
            except nats.errors.TimeoutError:
                await asyncio.sleep(0.2)

        async def one(m: dict[str, Any] | bytes, i: int) -> None:
            if isinstance(m, bytes):
                data, subj, hdr = m, raw_subject, {"Nats-Msg-Id": f"raw-{i}-{hash(m)}"}
            else:
                data, subj, hdr = json.dumps(m).encode(), subject(m), {"Nats-Msg-Id": m["id"]}
            for _ in range(200):
                try:
                    await js.publish(subj, data, headers=hdr, timeout=10)
                    return
                except (nats.js.errors.NoStreamResponseError, nats.errors.TimeoutError):
                    await asyncio.sleep(0.1)
            raise AssertionError(f"message {i} never acknowledged")

        for k in range(0, len(msgs), window):
            await asyncio.gather(*(one(m, k + j) for j, m in enumerate(msgs[k:k + window])))
    finally:
        await nc.close()
