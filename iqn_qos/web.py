"""The service's HTTP side: ``/metrics`` for Prometheus, the web page, the JSON API.

Handlers run on the HTTP server's threads and read only the current
:class:`~iqn_qos.view.View` (swapped in whole by the NATS loop), never the
store, so a slow scrape or page cannot stall ingestion and DuckDB is used only
by the service's store and inference threads (each with its own connection).
``POST /api/infer`` (on demand) is the one request that asks the loop to act,
through the ``infer_now`` callable it was given.

Metric names follow Prometheus' conventions (``iqn_qos_`` prefix, base units,
``_total`` counters); the per-component families carry only the labels
``component`` and ``kind`` (a group is ``a+b``), so their cardinality is bounded
by the topology.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import QosError
from .mle import Estimate
from .predict import predict_path
from .topology import Topology
from .view import DELAY_BUCKETS, View, name_of

CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"


class _ViewCollector(Collector):
    def __init__(self, get: Callable[[], View]) -> None:
        self.get = get

    def collect(self) -> Iterator[Metric]:
        v = self.get()
        c = v.counters
        last = v.history[-1] if v.history else None
        lab = ["component", "kind"]
        fams = {
            "p": GaugeMetricFamily("iqn_qos_component_bad_ratio",
                                   "estimated share of bad (stalled) units through it, latest slot",
                                   labels=lab),
            "lo": GaugeMetricFamily("iqn_qos_component_bad_ratio_lower",
                                    "lower end of the estimate's 95 % interval", labels=lab),
            "hi": GaugeMetricFamily("iqn_qos_component_bad_ratio_upper",
                                    "upper end of the estimate's 95 % interval", labels=lab),
            "faulty": GaugeMetricFamily("iqn_qos_component_faulty",
                                        "1 when the interval lies above the threshold", labels=lab),
        }
        if last is not None:
            for e in last[1]:
                val = [name_of(e.component), v.kind_of(e.component)]
                fams["p"].add_metric(val, e.p)
                fams["lo"].add_metric(val, e.lo)
                fams["hi"].add_metric(val, e.hi)
                fams["faulty"].add_metric(val, 1.0 if e.faulty else 0.0)
        yield from fams.values()
        rec = CounterMetricFamily("iqn_qos_ingest_records", "export records stored (new ids), by type",
                                  labels=["type"])
        for typ, n in sorted(c.records.items()):
            rec.add_metric([typ], float(n))
        yield rec
        for name, count, doc in (
            ("iqn_qos_ingest_lines", c.lines, "media lines stored from session records"),
            ("iqn_qos_ingest_duplicates", c.duplicates,
             "records already stored (re-deliveries, regrouped re-sends)"),
            ("iqn_qos_ingest_rejected", c.rejected, "records kept in the rejected table (unusable)"),
            ("iqn_qos_ingest_batches", c.batches, "batches stored and acknowledged"),
            ("iqn_qos_inferences", c.inferences, "slot inferences run"),
        ):
            yield CounterMetricFamily(name, doc, value=float(count))
        yield GaugeMetricFamily("iqn_qos_consumer_lag_messages",
                                "messages of the stream the durable consumer has not delivered yet",
                                value=float(c.lag))
        yield GaugeMetricFamily("iqn_qos_consumer_ack_pending_messages",
                                "messages delivered to the service and not yet acknowledged",
                                value=float(c.ack_pending))
        if c.last_slot is not None:
            yield GaugeMetricFamily("iqn_qos_last_slot_inferred_timestamp_seconds",
                                    "start (epoch) of the latest slot inferred", value=float(c.last_slot))
        cum = 0
        buckets = []
        for le, n in zip((*DELAY_BUCKETS, float("inf")), c.delay_counts.tolist(), strict=True):
            cum += int(n)
            buckets.append(("+Inf" if le == float("inf") else repr(le), float(cum)))
        yield HistogramMetricFamily("iqn_qos_ingest_delay_seconds",
                                    "record written at the router -> stored here (router's clock)",
                                    buckets=buckets, sum_value=c.delay_sum)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>IQN QoS: where do the stalls come from?</title>
<style>
body{font-family:sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse;font-size:13px}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
td.c,th.c{text-align:left}tr.faulty td{background:#fde2e1}#heat{max-width:100%;border:1px solid #ccc}
.small{color:#666;font-size:12px}
</style></head><body>
<h1>Where do the stalls come from?</h1>
<p class="small" id="status">waiting for the first estimates...</p>
<img id="heat" alt="heat map of the components ever faulty" src="heatmap.png?v=0">
<h2>Components, worst first</h2>
<table id="components"><thead><tr><th>#</th><th class="c">component</th><th class="c">kind</th><th>p</th>
<th>95 % interval</th><th>lines</th><th class="c">faulty</th><th class="c">p per slot</th></tr></thead>
<tbody></tbody></table>
<script>
let shown = -1;
function spark(series) {
  const w = 160, h = 24, n = series.length;
  const top = Math.max(0.01, ...series.map(s => s[3]));
  const pts = series.map((s, i) => `${n < 2 ? w / 2 : i * w / (n - 1)},${h - s[1] / top * h}`).join(" ");
  return `<svg width="${w}" height="${h}"><polyline fill="none" stroke="#c0392b" points="${pts}"/></svg>`;
}
async function refresh() {
  try {
    const r = await fetch("api/components", {cache: "no-store"});
    const d = await r.json();
    if (d.version !== shown) {
      shown = d.version;
      const when = d.last_slot === null ? "none yet" : new Date(d.last_slot * 1000).toISOString();
      document.getElementById("status").textContent =
        `latest slot inferred: ${when}; ${d.slots.length} slot(s) kept; records: ` +
        `${d.ingest.records.session} sessions, ${d.ingest.records.stall} stalls; lag ${d.ingest.lag}`;
      document.getElementById("heat").src = "heatmap.png?v=" + d.version;
      const rows = d.components.map((c, i) =>
        `<tr class="${c.faulty ? "faulty" : ""}" data-component="${c.name}"><td>${i + 1}</td>` +
        `<td class="c">${c.name}</td><td class="c">${c.kind}</td><td>${c.p.toFixed(4)}</td>` +
        `<td>[${c.lo.toFixed(4)}, ${c.hi.toFixed(4)}]</td><td>${c.lines}</td>` +
        `<td class="c">${c.faulty ? "FAULTY" : ""}</td><td class="c">${spark(c.series)}</td></tr>`);
      document.querySelector("#components tbody").innerHTML = rows.join("");
    }
  } catch (e) {
    document.getElementById("status").textContent = "service unreachable: " + e;
  }
}
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""


def estimate_json(slot: float, e: Estimate) -> dict[str, Any]:
    """One estimate as ``iqn-qos infer --json`` writes it."""
    comp: object = e.component if isinstance(e.component, str) else list(e.component)
    return {"slot": slot, "component": comp, "p": e.p, "lo": e.lo, "hi": e.hi, "lines": e.lines,
            "faulty": e.faulty}


class Web:
    """The HTTP server of one service: ``view()`` gives the current picture."""

    def __init__(self, view: Callable[[], View], topology: Topology, infer_now: Callable[[], int]) -> None:
        self.view = view
        self.topology = topology
        self.infer_now = infer_now
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ViewCollector(view))
        self._heat_lock = threading.Lock()
        self._heat: tuple[int, bytes] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="iqn-qos-web-")
        self._server: ThreadingHTTPServer | None = None

    # -- content --

    def heatmap_png(self) -> bytes:
        """The heat map of the kept slots, rendered once per view version (matplotlib, one at a time)."""
        v = self.view()
        with self._heat_lock:
            if self._heat is not None and self._heat[0] == v.version:
                return self._heat[1]
            from .heatmap import plot_heatmap

            out = Path(self._tmp.name) / "heat.png"
            plot_heatmap(list(v.history), out, threshold=v.threshold)
            png = out.read_bytes()
            self._heat = (v.version, png)
            return png

    def predict(self, q: dict[str, list[str]]) -> dict[str, Any]:
        """``GET /api/predict?path=A,B`` or ``?client=ADDR&server=ADDR``, ``&slots=K&half_life=H``."""
        path = q.get("path", [""])[0]
        if path:
            comps = tuple(c.strip() for c in path.split(",") if c.strip())
            for c in comps:
                if c not in self.topology.components:
                    raise QosError(f"--path: unknown component {c!r} (not in the service's topology)")
        elif q.get("client") and q.get("server"):
            comps = self.topology.resolve(q["client"][0], q["server"][0])
        else:
            raise QosError("give path=A,B,C or client=ADDR&server=ADDR")
        try:
            k = int(q.get("slots", ["4"])[0])
            half = float(q.get("half_life", ["1"])[0])
        except ValueError:
            raise QosError("slots must be a whole number and half_life a number") from None
        if k < 1:
            raise QosError(f"--slots must be >= 1, got {k}")
        hist = list(self.view().history)[-k:]
        if not hist:
            raise QosError("the service has no estimates yet")
        fc = predict_path(comps, hist, half_life=half)
        return {"path": list(fc.path), "p": fc.p, "lo": fc.lo, "hi": fc.hi, "slots": fc.slots,
                "unknown": list(fc.unknown)}

    # -- server --

    def start(self, host: str, port: int) -> tuple[str, int]:
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:  # quiet: the service logs what matters
                pass

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, code: int, obj: object) -> None:
                self._send(code, json.dumps(obj).encode(), "application/json")

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlsplit(self.path)
                q = parse_qs(url.query)
                try:
                    if url.path == "/metrics":
                        self._send(200, generate_latest(web.registry), CONTENT_TYPE_METRICS)
                    elif url.path in ("/", "/index.html"):
                        self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                    elif url.path == "/heatmap.png":
                        self._send(200, web.heatmap_png(), "image/png")
                    elif url.path == "/api/components":
                        self._json(200, web.view().api())
                    elif url.path == "/api/estimates":
                        k = int(q.get("slots", ["96"])[0])
                        hist = list(web.view().history)[-max(k, 1):]
                        self._json(200, [estimate_json(s, e) for s, es in hist for e in es])
                    elif url.path == "/api/predict":
                        self._json(200, web.predict(q))
                    elif url.path == "/healthz":
                        self._send(200, b"ok\n", "text/plain")
                    else:
                        self._json(404, {"error": f"no such endpoint {url.path}"})
                except (QosError, ValueError) as e:
                    self._json(400, {"error": str(e)})

            do_HEAD = do_GET  # noqa: N815

            def do_POST(self) -> None:  # noqa: N802
                if urlsplit(self.path).path != "/api/infer":
                    self._json(404, {"error": f"no such endpoint {self.path}"})
                    return
                try:
                    n = web.infer_now()
                except QosError as e:
                    self._json(503, {"error": str(e)})
                    return
                self._json(200, {"inferred": n, "last_slot": web.view().counters.last_slot})

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise QosError(f"--listen {host}:{port}: {e.strerror}") from None
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="iqn-qos-http", daemon=True).start()
        h, p = self._server.server_address[:2]
        return str(h), int(p)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._tmp.cleanup()
