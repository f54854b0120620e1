"""The node's HTTP port (`CXR_HTTP_PORT`): /metrics, /health and a read-only status page.

A small WSGI application on the standard library's server, one thread per request; the
Prometheus exposition is prometheus_client's own WSGI app. The port has no authentication,
so nothing here changes state: the status page shows the `cxr-node retry` command for a
dead letter instead of a button (see docs/OPERATOR.md). Bind it to 127.0.0.1 (the default)
or to a management network only.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from dicom_node import dimse_status
from dicom_node.learning.live import BundleFigures
from dicom_node.learning.present import DRIFT_TEST, TextTable, agreement_table, drift_table
from dicom_node.operations.health import Health
from dicom_node.records.ledger import Job, JobState, Refusal

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s", format % args)


@dataclass
class StatusView:
    """What the status page shows, gathered per request."""

    title: str
    counts: Callable[[], dict[str, int]]
    recent: Callable[[], list[Job]]
    failures: Callable[[], list[Job]]
    bundle: Callable[[], dict[str, str]]
    installed: Callable[[], list[dict[str, str]]]
    #: Instances refused with a failure status, newest first.
    refusals: Callable[[], list[Refusal]] = field(default=lambda: [])
    #: Agreement with confirmed diagnoses and drift, per bundle version.
    figures: Callable[[], list[BundleFigures]] = field(default=lambda: [])
    drift_days: float = 30.0


def _when(ts: float) -> str:
    text = datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return f"<span class='when'>{text}</span>"


def _latency(job: Job) -> str:
    if job.state in (JobState.DELIVERED, JobState.ANALYSED, JobState.FAILED, JobState.REJECTED):
        return f"{job.updated_at - job.received_at:.1f} s"
    return f"{time.time() - job.received_at:.0f} s so far"


def _table(headers: list[str], rows: list[list[str]], cls: str) -> str:
    if not rows:
        return "<p class='none'>none</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text_table(table: TextTable, cls: str) -> str:
    return _table(table.headers, [[html.escape(c) for c in row] for row in table.rows], cls)


def _figures(view: StatusView) -> tuple[str, str]:
    try:
        figures = view.figures()
    except Exception as exc:  # the page shows the rest all the same
        log.warning("agreement figures not available: %s", exc)
        note = f"<p class='none'>not available: {html.escape(str(exc))}</p>"
        return note, note
    return (
        _text_table(agreement_table(figures), "agreement"),
        _text_table(drift_table(figures, view.drift_days), "drift"),
    )


def render_status(view: StatusView) -> str:
    e = html.escape
    counts = view.counts()
    agreement_html, drift_html = _figures(view)
    bundle = view.bundle()
    jobs = [
        [
            f"<code>{e(j.job_id)}</code>",
            f"<span class='state {e(str(j.state))}'>{e(str(j.state))}</span>",
            _when(j.received_at),
            e(_latency(j)),
            e(j.calling_ae),
            f"<code>{e(j.sop_instance_uid)}</code>",
            e(j.reason or ""),
        ]
        for j in view.recent()
    ]
    failures = [
        [
            f"<code>{e(j.job_id)}</code>",
            _when(j.updated_at),
            e(j.reason or ""),
            f"<code>cxr-node retry {e(j.job_id)}</code>",
        ]
        for j in view.failures()
    ]
    refusals = [
        [
            _when(r.at),
            e(r.calling_ae),
            e(r.address),
            f"<span class='status'>{e(dimse_status.describe(r.status))}</span>",
            e(r.reason),
        ]
        for r in view.refusals()
    ]
    installed = [
        [e(b["version"]), e(b["device_uid"]), e(b["folder"]), e(b["role"])]
        for b in view.installed()
    ]
    bundle_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in bundle.items())
    count_cells = "".join(
        f"<div class='count {e(s)}'><b>{n}</b> {e(s)}</div>" for s, n in counts.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="30">
<title>{e(view.title)} - status</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; font-size: 90%;
  vertical-align: top; }}
code, .when {{ white-space: nowrap; }}
.count {{ display: inline-block; margin-right: 1.5em; }}
.state.failed {{ color: #b00; font-weight: bold; }}
.state.delivered {{ color: #070; }}
.status {{ color: #b00; white-space: nowrap; }}
.none {{ color: #777; }}
</style></head>
<body>
<h1>{e(view.title)}</h1>
<p>Research use only. Not for diagnostic use. This page only shows; it changes nothing.
Refreshes every 30 s. Metrics: <a href="/metrics">/metrics</a>, health:
<a href="/health">/health</a>.</p>
<h2>Jobs by state</h2>
<div id="counts">{count_cells}</div>
<h2>Model bundle in use</h2>
<table id="bundle">{bundle_rows}</table>
<h2>Agreement with confirmed diagnoses</h2>
<p>Studies with a confirmed diagnosis (<code>cxr-node label</code>), each with the highest
score a bundle version gave its images, against that version's threshold (score &gt;=
threshold: positive). ROC AUC with a stratified bootstrap interval (seed 0).</p>
{agreement_html}
<h2>Score drift</h2>
<p>{e(DRIFT_TEST)}; a warning when p is below the threshold shown. A change of case mix
moves the scores as much as a change of images does.</p>
{drift_html}
<h2>Delivery failures and analysis failures (dead letters)</h2>
<p>Retry one from the node host with the command shown (the destination is tried again
with the same result objects; a PACS replaces rather than duplicates them).</p>
{_table(["job", "since", "reason", "retry with"], failures, "failures")}
<h2>Refused instances</h2>
<p>C-STOREs the node answered with a failure status, newest first, with the reason it gave
the sender (Error Comment). Nothing of them was stored.</p>
{_table(["when", "calling AE", "address", "status", "reason"], refusals, "refusals")}
<h2>Recent jobs</h2>
{_table(["job", "state", "received", "latency", "from", "SOP Instance UID", "note"], jobs, "jobs")}
<h2>Installed bundles</h2>
{_table(["version", "device UID", "folder", "role"], installed, "installed")}
</body></html>
"""


def make_app(
    registry: CollectorRegistry | None, health: Health, view: StatusView | None = None
) -> WsgiApp:
    metrics_app = make_wsgi_app(registry) if registry is not None else None

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b"read-only\n"]
        if path == "/metrics" and metrics_app is not None:
            served: Iterable[bytes] = metrics_app(environ, start_response)
            return served
        if path == "/health":
            healthy, report = health.run()
            body = json.dumps(report, indent=2).encode()
            start_response(
                "200 OK" if healthy else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
            )
            return [body]
        if path == "/" and view is not None:
            page = render_status(view).encode()
            start_response(
                "200 OK",
                [
                    ("Content-Type", "text/html; charset=utf-8"),
                    ("Cache-Control", "no-store"),
                    ("X-Frame-Options", "DENY"),
                    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
                ],
            )
            return [page]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


class HttpServer:
    """The WSGI app served from a background thread; `stop` closes the port."""

    def __init__(self, bind: str, port: int, app: WsgiApp) -> None:
        self._server = make_server(
            bind, port, app, server_class=_Server, handler_class=_QuietHandler
        )
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="http", kwargs={"poll_interval": 0.5}
        )
        self._thread.daemon = True
        self._thread.start()
        log.info("HTTP on %s:%d: /metrics, /health, /", bind, self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def start_http(bind: str, port: int, app: WsgiApp) -> HttpServer | None:
    """Start the HTTP server; None (and an error in the log) when the port cannot be had:
    observability never stops the node from receiving images."""
    try:
        return HttpServer(bind, port, app)
    except OSError as exc:
        log.error("HTTP server not started on %s:%d: %s", bind, port, exc)
        return None
