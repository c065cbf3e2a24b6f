"""iqn_lab.jetstream starts real nats-server nodes: one node takes a
de-duplicated publish; a 3-node cluster keeps an R3 stream through a node's
SIGKILL and restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from iqn_lab.errors import LabError
from iqn_lab.jetstream import JetStream


async def _publish(js: object, msg_id: str) -> None:
    """Publish until acknowledged: right after a stream is created or a node
    dies, the stream's own leader may not be elected yet ("no response from
    stream"), and a real publisher retries the same Nats-Msg-Id."""
    import nats.errors
    import nats.js.errors

    for _ in range(100):
        try:
            await js.publish("t.x", msg_id.encode(), headers={"Nats-Msg-Id": msg_id})  # type: ignore[attr-defined]
            return
        except (nats.js.errors.NoStreamResponseError, nats.errors.TimeoutError):
            await asyncio.sleep(0.1)
    raise AssertionError(f"{msg_id} never acknowledged")


async def _publish_and_count(urls: list[str], replicas: int, ids: list[str]) -> int:
    import nats
    import nats.errors

    nc = await nats.connect(servers=urls, connect_timeout=5)
    try:
        js = nc.jetstream()
        for _ in range(100):  # a meta-leader election can be under way
            try:
                await js.add_stream(name="T", subjects=["t.>"], num_replicas=replicas)
                break
            except nats.errors.TimeoutError:
                await asyncio.sleep(0.1)
        for i in ids:
            await _publish(js, i)
        info = await js.stream_info("T")
        return int(info.state.messages)
    finally:
        await nc.close()


def test_single_node_dedups(tmp_path: Path) -> None:
    with JetStream.start(1, tmp_path) as js:
        assert asyncio.run(_publish_and_count(js.urls, 1, ["a", "b", "a", "c", "b"])) == 3


def test_cluster_survives_a_killed_node(tmp_path: Path) -> None:
    with JetStream.start(3, tmp_path) as js:
        assert asyncio.run(_publish_and_count(js.urls, 3, [f"m{i}" for i in range(50)])) == 50
        js.kill(0)
        assert not js.nodes[0].running
        js.wait_leader()
        # the two survivors keep quorum: new and re-sent messages, each counted once
        left = js.urls[1:]
        assert asyncio.run(_publish_and_count(left, 3, [f"m{i}" for i in range(40, 80)])) == 80
        js.restart(0)
        assert js.nodes[0].running


def test_missing_store_dir_parent_and_bad_count(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="at least one node"):
        JetStream.start(0, tmp_path)
