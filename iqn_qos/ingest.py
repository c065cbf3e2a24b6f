"""The live service's logic without I/O: export messages in, rows to store and
slots to infer out (``iqn-qos serve`` wraps it in a NATS loop and an HTTP server).

Messages follow the export schema (docs/export.md): a v1 message is one record, a
v2 ``batch`` message carries many v1 records (what makes 100,000 records/s
possible: the per-message costs of NATS and acknowledgements are paid once per
batch).  A ``session`` record is one watched-time record of an ISP agent and becomes a
media line through :func:`session_line`, the very function ``iqn-qos
from-agent`` uses on the agent's SQLite rows; a ``stall`` message is
kept for display.  A record that cannot be used (bad JSON, a newer schema
version, an address the topology cannot place) is *rejected*: kept with its
reason so nothing is silently lost, and acknowledged so it is not re-delivered
forever.

When is a slot inferred?  A slot ``[s, s + slot_s)`` is *closed* once the
service's wall clock passes ``s + slot_s + grace`` (the agent writes a slot's
rows 2 s after its end and the export adds its own delay; ``grace`` covers
both).  Every slot that gained lines since its last inference is *dirty*; a
closed dirty slot is inferred at the next :meth:`SlotPlanner.due`.  So a slot is
inferred once when it closes, again if late records (a backlog drained after a
broker outage, a re-delivery) add lines to it, and on demand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from math import isfinite
from typing import Annotated, Any, Literal

import numpy as np

from .errors import QosError
from .lines import MediaLine
from .mle import slot_of
from .topology import Topology

#: the newest export schema version this service reads: v2 adds the batch message (many
#: v1 records in one NATS message), v1 messages are still read
SCHEMA_VERSION = 2
#: the version of a record (a v1 message, or an element of a v2 batch's ``records``)
RECORD_VERSION = 1
BATCH_VERSION = 2
BATCH_TYPE = "batch"
#: addresses placed on nodes kept before the cache starts over
PATH_CACHE = 100_000

try:  # orjson parses a message ~3x faster than json (the decode's largest cost); optional
    import orjson

    _loads: Callable[[bytes], object] = orjson.loads
    _dumps: Callable[[object], bytes] = orjson.dumps
except ImportError:  # pragma: no cover - the qos extra installs it
    _loads = json.loads

    def _dumps(obj: object) -> bytes:
        return json.dumps(obj).encode()


try:  # msgspec decodes a well-formed session batch into typed objects in C (~2x orjson + the checks)
    import msgspec

    _Id = Annotated[str, msgspec.Meta(min_length=1)]

    class _SessionFields(msgspec.Struct, gc=False):
        """A schema-v1 session record as the fast path takes it: every type is checked by the
        decoder; anything else (a stall, a bool, a missing field...) fails the decode and the
        message goes the general way, which accepts or rejects it with its reason."""

        v: Literal[1]
        id: _Id
        router: _Id
        client: _Id = msgspec.field(name="client.address")
        server: _Id = msgspec.field(name="server.address")
        slot: float = msgspec.field(name="iqn.slot")
        watched: float = msgspec.field(name="iqn.watched_s")
        stalled: float = msgspec.field(name="iqn.stalled_s")
        at: float | None = msgspec.field(name="iqn.recorded_at", default=None)

    class _Session(_SessionFields, tag_field="type", tag="session", gc=False):
        """A v1 message: its ``type`` tells it from a batch (a tag is required in a union)."""

    class _InnerSession(_SessionFields, kw_only=True, gc=False):
        """A record of a batch: ``type`` an ordinary required field (a struct's tag is optional
        when it is not in a union, and a record without a type is rejected)."""

        type: Literal["session"]

    class _SessionBatch(msgspec.Struct, tag_field="type", tag="batch", gc=False):
        v: Literal[2]
        id: _Id
        records: list[_InnerSession]
        router: str = ""

    _fast_decoder: Any = msgspec.json.Decoder(_SessionBatch | _Session)
    _FastError: tuple[type[Exception], ...] = (msgspec.DecodeError,)
except ImportError:  # pragma: no cover - the qos extra installs it
    _fast_decoder = None
    _FastError = ()


def _finite(x: object) -> bool:
    """A real number (not a bool), finite: one type test per value (the decode's hot path)."""
    t = type(x)
    return (t is float and math.isfinite(x)) or t is int  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class StallRow:
    """One finished stall of an agent, kept for display (not used by the estimator)."""

    router: str
    interface: str
    client: str
    server: str
    start: float
    end: float
    duration_s: float
    candidates: int
    state: str
    detected_at: float


@dataclass(slots=True)
class Decoded:
    """One record, decoded: ``line`` for a session with a watched second, ``stall`` for a
    stall, neither for a session with nothing watched; ``error`` when rejected.  Not frozen:
    the service makes one per record, and a frozen dataclass' ``__init__`` (one
    ``object.__setattr__`` per field) costs ~4x a plain one's."""

    id: str
    type: str
    router: str
    line: MediaLine | None = None
    stall: StallRow | None = None
    error: str | None = None
    at: float | None = None  # when the router recorded it (epoch s), for the delay metric
    raw: bytes | None = None  # a rejected record of a batch: its own JSON (kept in ``rejected``)


@dataclass(slots=True)
class Columns:
    """The records of a batch of messages, decoded: the well-formed session records column by
    column (``id`` ... ``path``), everything else (stalls, rejected records, sessions with unusual
    values) as :class:`Decoded` in ``others`` with ``raw[i]`` the message ``others[i]`` came in.

    Why columns: a record is then a few list items, not a :class:`Decoded` and a
    :class:`MediaLine` (the decode's and the store's Python work per record was most of the
    service's CPU), the store hands the columns to DuckDB as they are, and a puller process
    (``iqn-qos serve --pullers``) sends a batch to the store writer as a few pickled lists and
    arrays.  A session row with ``n == 0`` had nothing watched: it is a record but no line
    (``path`` -1); ``at`` is NaN where the record has no ``iqn.recorded_at``; ``path[i]`` indexes
    ``paths``, the batch's distinct paths."""

    id: list[str]
    router: list[str]
    client: list[str]
    server: list[str]
    t: np.ndarray  # float64: the slot's start
    n: np.ndarray  # int64: watched units
    m: np.ndarray  # int64: good units
    at: np.ndarray  # float64
    path: np.ndarray  # int32
    paths: list[tuple[str, ...]]
    others: list[Decoded]
    raw: list[bytes]
    pending: int = 0  # messages the stream still held after this batch's last (the puller's lag)
    messages: int = 0  # messages the batch came in (set by the puller)

    def __len__(self) -> int:
        return len(self.id) + len(self.others)

    def ids(self) -> list[str]:
        """Every record's id (sessions first, then the others)."""
        return self.id + [d.id for d in self.others]

    def decoded(self) -> list[Decoded]:
        """Every record as :class:`Decoded` (sessions first, then the others): what
        :meth:`Decoder.decode_message` gives, for callers that want records, not columns."""
        out = [
            Decoded(i, "session", r, at=None if math.isnan(a) else a,
                    line=MediaLine(t, self.paths[k], n, m, c, sv, r, "iqn") if k >= 0 else None)
            for i, r, c, sv, t, n, m, a, k in zip(
                self.id, self.router, self.client, self.server, self.t.tolist(), self.n.tolist(),
                self.m.tolist(), self.at.tolist(), self.path.tolist(), strict=True)
        ]
        return out + self.others

    def stamped(self) -> list[tuple[str, float | None, float | None]]:
        """(id, recorded at, line time: None without a line) of every record: for benchmarks and
        tests that time records (``on_stored``)."""
        out: list[tuple[str, float | None, float | None]] = [
            (i, None if math.isnan(a) else a, t if n >= 1 else None)
            for i, a, t, n in zip(self.id, self.at.tolist(), self.t.tolist(), self.n.tolist(), strict=True)]
        out += [(d.id, d.at, d.line.t if d.line is not None else None) for d in self.others]
        return out


def _str(obj: dict[str, object], key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v:
        raise QosError(f"{key!r} must be a non-empty string, got {v!r}")
    return v


def _num(obj: dict[str, object], key: str) -> float:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise QosError(f"{key!r} must be a number, got {v!r}")
    return float(v)


def session_line(
    router: str, client: str, server: str, slot: object, watched_s: object, stalled_s: object,
    topology: Topology | Callable[[str, str], tuple[str, ...]] | None = None,
) -> MediaLine | None:
    """The media line of one watched-time record (a ``sessions`` row, or a schema-v1 session
    message of the live export: ``iqn-qos serve``); None when under half a second was watched.

    The one mapping from the agent's record to a line, shared by ``from-agent`` and ``serve``:
    a unit is one second of playback, a bad unit a stalled second, so ``n = round(watched_s)``,
    ``m = n - round(stalled_s)``, ``t`` the slot's start, the path resolved (server to client)
    through ``topology`` when one is given.  Bad values raise :class:`QosError`."""
    if not (_finite(slot) and _finite(watched_s) and _finite(stalled_s)) and not all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            for x in (slot, watched_s, stalled_s)):
        raise QosError(f"bad slot/watched/stalled seconds ({slot!r}, {watched_s!r}, {stalled_s!r})")
    assert isinstance(slot, int | float) and isinstance(watched_s, int | float)
    assert isinstance(stalled_s, int | float)
    if not 0 <= stalled_s <= watched_s:
        raise QosError(f"bad watched/stalled seconds ({watched_s!r}, {stalled_s!r})")
    n = round(watched_s)
    if n < 1:
        return None  # under half a second watched: no whole unit to report
    m = n - min(round(stalled_s), n)
    path_ids: tuple[str, ...] = ()
    if isinstance(topology, Topology):
        path_ids = topology.resolve(client, server)
    elif topology is not None:  # a caching resolver (:class:`Decoder`)
        path_ids = topology(client, server)
    return MediaLine(float(slot), path_ids, n, m, client, server, router, "iqn")


class Decoder:
    """Schema-v1 messages to :class:`Decoded`, paths resolved through ``topology`` (cached
    per client and server address: a router's clients come back every slot)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._nodes: dict[str, str] = {}  # address -> node
        self._paths: dict[tuple[str, str], tuple[str, ...]] = {}  # (client node, server node) -> path
        self._pairs: dict[tuple[str, str], tuple[str, ...]] = {}  # (client, server address) -> path

    def _node(self, addr: str) -> str:
        got = self._nodes.get(addr)
        if got is None:
            got = self.topology.node_of(addr)
            if len(self._nodes) >= PATH_CACHE:
                self._nodes.clear()
            self._nodes[addr] = got
        return got

    def _resolve(self, client: str, server: str) -> tuple[str, ...]:
        """The path between the two addresses' nodes (BFS once per node pair: many clients
        share a subnet)."""
        pair = (client, server)
        got = self._pairs.get(pair)
        if got is not None:  # the common case: this client was seen before (one lookup)
            return got
        key = (self._node(client), self._node(server))
        got = self._paths.get(key)
        if got is None:
            got = self.topology.path_between(key[1], key[0], client, server)
            self._paths[key] = got
        if len(self._pairs) >= PATH_CACHE:
            self._pairs.clear()
        self._pairs[pair] = got
        return got

    def decode(self, data: bytes, fallback_id: str = "") -> Decoded:
        """One message holding one record (schema v1); never raises: a bad one comes back with
        ``error`` set (and its ``id``, or ``fallback_id`` (the broker's sequence) when it has
        none).  A schema-v2 batch holds many: :meth:`decode_message`."""
        got = self.decode_message(data, fallback_id)
        if len(got) == 1:
            return got[0]
        return Decoded(fallback_id, "batch", "", error=f"a batch of {len(got)} records (decode_message)")

    def decode_message(self, data: bytes, fallback_id: str = "") -> list[Decoded]:
        """Every record of one message: one for a schema-v1 message, each of a v2 batch's
        ``records`` (docs/export.md); never raises (see :meth:`decode`).  A bad record of a
        batch is rejected by itself (its ``raw`` is its own JSON), a bad batch as a whole.  The
        fast path is :meth:`decode_columns`'s, so both accept and reject the same records."""
        return self.decode_columns([data], [fallback_id]).decoded()

    def _decode_general(self, data: bytes, fallback_id: str) -> list[Decoded]:
        """:meth:`decode_message` without the fast path: any message, record by record."""
        try:
            obj = _loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            return [Decoded(fallback_id, "?", "", error=f"not JSON ({e})")]
        if not isinstance(obj, dict):
            return [Decoded(fallback_id, "?", "", error="not a JSON object")]
        v = obj.get("v")
        if type(v) is int and v == BATCH_VERSION and obj.get("type") == BATCH_TYPE:
            return self._batch(obj, fallback_id)
        return [self._record(obj, fallback_id, False)]

    def _batch(self, obj: dict[str, Any], fallback_id: str) -> list[Decoded]:
        bid = obj.get("id")
        rtr = obj.get("router")
        rtr = rtr if isinstance(rtr, str) else ""
        recs = obj.get("records")
        if not isinstance(bid, str) or not bid:
            return [Decoded(fallback_id, BATCH_TYPE, rtr, error="no 'id'")]
        if not isinstance(recs, list) or not recs:
            return [Decoded(bid, BATCH_TYPE, rtr, error="'records' must be a non-empty list")]
        out = []
        for i, r in enumerate(recs):
            if isinstance(r, dict):
                out.append(self._record(r, f"{bid}#{i}", True))
            else:
                out.append(Decoded(f"{bid}#{i}", "?", rtr, error="a record is not a JSON object",
                                   raw=_dumps(r)))
        return out

    def decode_columns(self, datas: Iterable[bytes], ids: Iterable[str]) -> Columns:
        """Every record of a batch of messages as :class:`Columns` (``ids[i]`` names message i
        when it has no id of its own); never raises.  A message of well-formed session records
        goes the fast way (msgspec, straight into the columns); any other message, or one with a
        single unusual record, the general way (:meth:`_decode_general`), record by record: both
        accept and reject exactly the same records."""
        rows: list[tuple[str, str, str, str, float, int, int, float, int]] = []
        others: list[Decoded] = []
        raw: list[bytes] = []
        paths: list[tuple[str, ...]] = []
        local: dict[tuple[str, str], int] = {}  # (client, server) -> index in paths
        index: dict[tuple[str, ...], int] = {}  # path -> index in paths
        routers: dict[str, str] = {}  # one str object per router name: pickled once, not per record
        pairs = self._pairs
        nan = math.nan
        for data, fid in zip(datas, ids, strict=True):
            recs = self._fast_records(data)
            mine: list[tuple[str, str, str, str, float, int, int, float, int]] = []
            ok = recs is not None
            for r in recs if recs is not None else ():
                w, st = r.watched, r.stalled
                # one test for all three: a sum of finite floats is finite (an overflow to inf only
                # sends the message the general way)
                if not (isfinite(r.slot + w + st) and 0 <= st <= w):
                    ok = False
                    break
                n = round(w)
                k = -1
                if n >= 1:
                    key = (r.client, r.server)
                    k = local.get(key, -1)
                    if k < 0:
                        path = pairs.get(key)
                        if path is None:
                            try:
                                path = self._resolve(r.client, r.server)
                            except QosError:
                                ok = False
                                break
                        k = index.get(path, -1)
                        if k < 0:
                            k = index[path] = len(paths)
                            paths.append(path)
                        local[key] = k
                rtr = routers.setdefault(r.router, r.router)
                mine.append((r.id, rtr, r.client, r.server, r.slot, n, n - min(round(st), n) if n else 0,
                             nan if r.at is None else r.at, k))
            if ok:
                rows += mine
            else:
                got = self._decode_general(data, fid)
                others += got
                raw += [data] * len(got)
        if rows:
            c_id, c_rtr, c_cli, c_srv, c_t, c_n, c_m, c_at, c_p = map(list, zip(*rows, strict=True))
        else:
            c_id, c_rtr, c_cli, c_srv, c_t, c_n, c_m, c_at, c_p = [], [], [], [], [], [], [], [], []
        return Columns(c_id, c_rtr, c_cli, c_srv, np.array(c_t, np.float64), np.array(c_n, np.int64),
                       np.array(c_m, np.int64), np.array(c_at, np.float64), np.array(c_p, np.int32), paths,
                       others, raw)

    def _fast_records(self, data: bytes) -> list[Any] | None:
        """The records of a message of well-formed session records only (msgspec's typed decode),
        else None."""
        if _fast_decoder is None:
            return None
        try:
            got = _fast_decoder.decode(data)
        except _FastError:
            return None
        recs: list[Any] = got.records if type(got) is _SessionBatch else [got]
        return recs or None

    def _session_fast(self, obj: dict[str, Any]) -> Decoded | None:
        """A well-formed v1 session record in one pass (the service's hot path: ~2x the general
        one); None for anything unusual, which the general path then decodes or rejects with
        its reason, so both paths accept exactly the same records."""
        try:
            mid, v, router = obj["id"], obj["v"], obj["router"]
            client, server = obj["client.address"], obj["server.address"]
            slot, w, st = obj["iqn.slot"], obj["iqn.watched_s"], obj["iqn.stalled_s"]
        except KeyError:
            return None
        if not (type(v) is int and v == RECORD_VERSION and type(mid) is str and mid and type(router) is str
                and router and type(client) is str and client and type(server) is str and server):
            return None
        for x in (slot, w, st):
            t = type(x)
            if not ((t is float and isfinite(x)) or t is int):
                return None
        if not 0 <= st <= w:  # type: ignore[operator]
            return None
        n = round(w)
        line = None
        if n >= 1:
            path = self._pairs.get((client, server))
            if path is None:
                try:
                    path = self._resolve(client, server)
                except QosError:
                    return None
            line = MediaLine(float(slot), path, n, n - min(round(st), n), client, server, router, "iqn")
        at = obj.get("iqn.recorded_at")
        return Decoded(mid, "session", router, line=line,
                       at=float(at) if isinstance(at, int | float) else None)

    def _record(self, obj: dict[str, Any], fallback_id: str, inner: bool) -> Decoded:
        """One record object (schema v1); ``inner``: it came in a batch (kept as ``raw`` when bad)."""
        if obj.get("type") == "session":
            fast = self._session_fast(obj)
            if fast is not None:
                return fast
        mid = obj.get("id")
        mid = mid if isinstance(mid, str) and mid else fallback_id
        typ = obj.get("type")
        typ = typ if isinstance(typ, str) else "?"
        rtr = obj.get("router")
        rtr = rtr if isinstance(rtr, str) else ""
        try:
            v = obj.get("v")
            if isinstance(v, bool) or not isinstance(v, int):
                raise QosError(f"'v' must be the schema version, got {v!r}")
            if v > SCHEMA_VERSION:
                raise QosError(f"schema version {v} is newer than this iqn-qos reads ({SCHEMA_VERSION})")
            if v == BATCH_VERSION:
                raise QosError(f"a schema-v{v} message is a {BATCH_TYPE!r} of v{RECORD_VERSION} records"
                               if not inner else f"a record inside a batch must be v{RECORD_VERSION}")
            if mid == fallback_id:
                raise QosError("no 'id'")
            if typ == "session":
                client, server = _str(obj, "client.address"), _str(obj, "server.address")
                router = _str(obj, "router")
                line = session_line(router, client, server, obj.get("iqn.slot"), obj.get("iqn.watched_s"),
                                    obj.get("iqn.stalled_s"), self._resolve)
                at = obj.get("iqn.recorded_at")
                return Decoded(mid, typ, router, line=line,
                               at=float(at) if isinstance(at, int | float) else None)
            if typ == "stall":
                state = obj.get("iqn.state")
                cand = obj.get("iqn.candidates")
                stall = StallRow(
                    _str(obj, "router"), str(obj.get("interface") or ""), _str(obj, "client.address"),
                    _str(obj, "server.address"), _num(obj, "iqn.start"), _num(obj, "iqn.end"),
                    _num(obj, "iqn.duration_s"), cand if isinstance(cand, int) else 0,
                    state if isinstance(state, str) else "", _num(obj, "iqn.detected_at"))
                return Decoded(mid, typ, stall.router, stall=stall, at=stall.detected_at)
            raise QosError(f"unknown message type {typ!r}")
        except QosError as e:
            return Decoded(mid, typ, rtr, error=str(e), raw=_dumps(obj) if inner else None)


@dataclass
class SlotPlanner:
    """Which slots to infer, and when (see the module's docstring)."""

    slot_s: float
    grace_s: float
    dirty: set[float] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.slot_s > 0:
            raise QosError(f"--slot must be positive, got {self.slot_s}")
        if self.grace_s < 0:
            raise QosError(f"--grace must be >= 0, got {self.grace_s}")

    def slot_of(self, t: float) -> float:
        return slot_of(t, self.slot_s)

    def added(self, lines: Iterable[MediaLine]) -> None:
        """New lines were stored: their slots need (re-)inference once closed."""
        # the distinct starts first (a slot's records all carry its start: a batch has a few)
        self.dirty.update(slot_of(t, self.slot_s) for t in {ln.t for ln in lines})

    def added_times(self, ts: np.ndarray) -> None:
        """New lines were stored, given by their times (:class:`Columns`)."""
        self.dirty.update(slot_of(float(t), self.slot_s) for t in np.unique(ts))

    def closed(self, slot: float, now: float) -> bool:
        return now >= slot + self.slot_s + self.grace_s

    def due(self, now: float) -> list[float]:
        """The dirty slots that are closed at ``now``, oldest first; they stop being dirty."""
        out = sorted(s for s in self.dirty if self.closed(s, now))
        self.dirty.difference_update(out)
        return out

    def next_due(self, now: float) -> float | None:
        """Seconds until the next dirty slot closes (None: nothing dirty)."""
        if not self.dirty:
            return None
        return max(0.0, min(s + self.slot_s + self.grace_s for s in self.dirty) - now)
