"""Prometheus metrics of a training run, exported locally or through Ray's metrics pipeline.

Names follow the Prometheus conventions: base units (seconds, bytes), counters end in
``_total``, everything starts with ``stylegen_``. Labels stay low-cardinality: ``run``,
``rank``, ``trial`` (plus ``term`` on the loss gauge and ``result`` on shard counts).
``TRAIN_SPECS``/``COMMAND_SPECS`` below are the single list of what the code registers; the
tests check the Grafana dashboard and the alert rules against it.

Backends (``TrainMetrics.create(backend, ...)``):

* ``"prometheus"``: a prometheus-client ``/metrics`` endpoint on ``host:port`` (127.0.0.1:9464
  by default, port 0 picks a free one) with its own ``CollectorRegistry``; ``close()`` stops it.
* ``"ray"``: ``ray.util.metrics`` Counter/Gauge/Histogram. Each Ray node's metrics agent
  serves them on the node's metrics export port, and the head node writes a Prometheus
  file_sd file listing every node's port (Ray 2.60: ``<temp_dir>/session_*/prom_metrics_
  service_discovery.json``, symlinked from ``/tmp/ray/prom_metrics_service_discovery.json``).
  Prometheus therefore finds every worker of every node with no hand-edited targets, and
  workers need no port of their own (no collisions when Train/Tune packs many workers on one
  node, nothing to clean up when a worker dies). Measured with Ray 2.60 (OpenTelemetry
  exporter): a metric named ``x`` is exposed as ``ray_x`` (counters get ``_total`` appended
  unless the name already ends with it, so ``stylegen_train_samples_total`` ->
  ``ray_stylegen_train_samples_total``), with extra labels ``WorkerId``, ``SessionName``,
  ``NodeAddress``, ``Component``, ``Version``, ``otel_scope_*``. ``infra/prometheus/
  prometheus.yml`` strips the ``ray_`` prefix of ``ray_stylegen_*`` at scrape time, so local
  and Ray runs share the same names, dashboard and alerts. A value recorded in a worker
  reaches the export port after up to ``metrics_report_interval_ms`` (10 s by default; ~9 s
  measured), then Prometheus' scrape interval adds to that. Ray computes a histogram's
  ``_sum`` from bucket midpoints, so exact totals are separate counters
  (``stylegen_train_step_seconds_total``, ``stylegen_data_wait_seconds_total``). Ray also
  drops NaN/Inf gauge values (measured: the series keeps its last finite value or never
  appears), hence ``stylegen_train_loss_nonfinite{term}`` (0/1) for the NaN alert.
  Tune trials are told apart by the ``trial`` label.
* ``"none"``: every call is a no-op.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from stylegen import __version__
from stylegen.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("prometheus", "ray", "none")
TRAIN_LABELS = ("run", "rank", "trial")
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()  # on top of the family's base labels
    buckets: tuple[float, ...] = ()


TRAIN_SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("stylegen_build_info", "gauge", "always 1; versions of stylegen, torch and ray",
               ("version", "torch", "ray")),
    MetricSpec("stylegen_train_running", "gauge", "1 while the training loop of this worker runs, 0 after it ends"),
    MetricSpec("stylegen_train_start_timestamp_seconds", "gauge", "unix time this worker (re)started training"),
    MetricSpec("stylegen_train_samples_total", "counter", "training samples (images) consumed"),
    MetricSpec("stylegen_train_steps_total", "counter", "optimisation steps done"),
    MetricSpec("stylegen_train_step_seconds_total", "counter",
               "wall time of all steps, data wait included (exact; use for shares)"),
    MetricSpec("stylegen_train_step_duration_seconds", "histogram", "wall time of one step, data wait included",
               buckets=STEP_BUCKETS),
    MetricSpec("stylegen_data_wait_seconds_total", "counter", "time spent waiting for the next batch"),
    MetricSpec("stylegen_train_loss", "gauge", "last loss value per unweighted term, and the weighted 'total'",
               ("term",)),
    MetricSpec("stylegen_train_loss_nonfinite", "gauge",
               "1 when the last value of a loss term was NaN/Inf, else 0 (Ray drops NaN gauge values)", ("term",)),
    MetricSpec("stylegen_val_score", "gauge", "last validation score"),
    MetricSpec("stylegen_checkpoint_save_duration_seconds", "histogram", "time to save one checkpoint",
               buckets=CHECKPOINT_BUCKETS),
    MetricSpec("stylegen_checkpoint_last_success_timestamp_seconds", "gauge",
               "unix time of the last successful checkpoint save"),
    MetricSpec("stylegen_worker_restarts_total", "counter", "times this worker resumed after a failure"),
    MetricSpec("stylegen_train_flops_per_second", "gauge",
               "achieved FLOP/s of this worker (FLOPs of one step, counted once, x steps per second)"),
    MetricSpec("stylegen_train_mfu_ratio", "gauge", "model FLOPs utilisation: achieved / train.peak_flops (0-1)"),
    MetricSpec("stylegen_data_resume_position", "gauge",
               "where the data stream of the last resume continued: the epoch and the batch in it", ("field",)),
    MetricSpec("stylegen_data_seek_seconds", "gauge", "time the last resume took to reach its first batch"),
    MetricSpec("stylegen_device_memory_allocated_bytes", "gauge",
               "accelerator memory held by tensors (torch.cuda.memory_allocated); GPU only"),
)

COMMAND_SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("stylegen_shard_images_total", "counter", "images read by 'stylegen shard' by result",
               ("result",)),
    MetricSpec("stylegen_stylize_images_total", "counter", "images written by 'stylegen stylize'"),
)

SERVE_LABELS = ("run", "trial")  # of the served model: its run (or "shipped") and sweep trial
SERVE_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SERVE_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
SERVE_SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("stylegen_serve_requests_total", "counter", "HTTP requests answered by 'stylegen serve'",
               ("route", "code")),
    MetricSpec("stylegen_serve_request_duration_seconds", "histogram",
               "time a replica took to answer one request (upload read, decode, batch queue, model, PNG)",
               ("route",), buckets=SERVE_LATENCY_BUCKETS),
    MetricSpec("stylegen_serve_request_seconds_total", "counter", "exact sum of the request times (Ray estimates "
               "a histogram's _sum)", ("route",)),
    MetricSpec("stylegen_serve_batch_size", "histogram", "requests per model call of the request batcher",
               buckets=SERVE_BATCH_BUCKETS),
    MetricSpec("stylegen_serve_images_total", "counter", "images stylized by 'stylegen serve'"),
    MetricSpec("stylegen_serve_errors_total", "counter", "requests refused or failed, by reason", ("reason",)),
)

METRIC_NAMES: tuple[str, ...] = tuple(s.name for s in TRAIN_SPECS + COMMAND_SPECS + SERVE_SPECS)
SHARD_RESULTS = ("written", "skipped")


def series_names(specs: tuple[MetricSpec, ...] = TRAIN_SPECS + COMMAND_SPECS + SERVE_SPECS) -> frozenset[str]:
    """Every sample name Prometheus stores for ``specs`` (histograms: _bucket, _sum, _count)."""
    out: set[str] = set()
    for s in specs:
        out.update([f"{s.name}_bucket", f"{s.name}_sum", f"{s.name}_count"] if s.kind == "histogram" else [s.name])
    return frozenset(out)


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


# ----------------------------------------------------------------------------- sinks

class _Sink(Protocol):
    def inc(self, name: str, value: float, tags: dict[str, str]) -> None: ...
    def set(self, name: str, value: float, tags: dict[str, str]) -> None: ...
    def observe(self, name: str, value: float, tags: dict[str, str]) -> None: ...
    def close(self) -> None: ...


class _NullSink:
    def inc(self, name, value, tags): pass
    def set(self, name, value, tags): pass
    def observe(self, name, value, tags): pass
    def close(self): pass


class _WithoutCreated:
    """Collector view of a registry minus the ``*_created`` samples prometheus-client adds.

    (Its own switch, ``disable_created_metrics()``, is process-global.) Scrapes then hold
    only the names in the specs.
    """

    def __init__(self, inner: Any):
        self._inner = inner

    def collect(self):
        for family in self._inner.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def _is_loopback(address: str) -> bool:
    """Whether a bound address is reachable only from this machine (127.0.0.0/8, ::1)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class _ClientSink:
    """prometheus-client metrics in a private registry, optionally served over HTTP."""

    def __init__(self, specs: tuple[MetricSpec, ...], base_labels: tuple[str, ...]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        inner = CollectorRegistry(auto_describe=True)
        kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
        self._metrics: dict[str, Any] = {}
        for s in specs:
            kw: dict[str, Any] = {"buckets": s.buckets} if s.kind == "histogram" else {}
            self._metrics[s.name] = kinds[s.kind](s.name, s.help, base_labels + s.labels, registry=inner, **kw)
        self.registry = CollectorRegistry(auto_describe=False)  # what is served
        self.registry.register(_WithoutCreated(inner))
        self._server: Any = None
        self._thread: Any = None
        self.url = ""

    def serve(self, host: str, port: int) -> str:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise UserError(f"cannot serve metrics on {host}:{port} ({e.strerror or e}): "
                            "pick another port with --set metrics.port=N (0 = any free port)") from e
        bound = self._server.server_port
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/metrics"
        if not _is_loopback(self._server.server_address[0]):
            log.warning("metrics endpoint %s is unauthenticated and bound to %s (not loopback): anyone who "
                        "reaches the port can read it; set metrics.host=127.0.0.1 unless a firewall limits who can",
                        self.url, self._server.server_address[0])
        return self.url

    def inc(self, name, value, tags):
        self._metrics[name].labels(**tags).inc(value)

    def set(self, name, value, tags):
        self._metrics[name].labels(**tags).set(value)

    def observe(self, name, value, tags):
        self._metrics[name].labels(**tags).observe(value)

    def close(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None


class _RaySink:
    """``ray.util.metrics`` objects; Ray's per-node agent exports them (see the module docstring)."""

    def __init__(self, specs: tuple[MetricSpec, ...], base_labels: tuple[str, ...]):
        import ray
        from ray.util import metrics as rm

        if not ray.is_initialized():
            raise UserError("metrics backend 'ray' needs a connected Ray worker or driver: call ray.init() "
                            "first, or use --set metrics.enabled=false / the local backend")
        self._metrics: dict[str, Any] = {}
        for s in specs:
            keys = base_labels + s.labels
            if s.kind == "counter":
                m = rm.Counter(s.name, description=s.help, tag_keys=keys)
            elif s.kind == "gauge":
                m = rm.Gauge(s.name, description=s.help, tag_keys=keys)
            else:
                m = rm.Histogram(s.name, description=s.help, boundaries=list(s.buckets), tag_keys=keys)
            self._metrics[s.name] = m

    def inc(self, name, value, tags):
        if value > 0:  # ray's Counter.inc rejects 0
            self._metrics[name].inc(value, tags=tags)

    def set(self, name, value, tags):
        self._metrics[name].set(value, tags=tags)

    def observe(self, name, value, tags):
        self._metrics[name].observe(value, tags=tags)

    def close(self):
        pass

    @staticmethod
    def node_url() -> str:
        """The /metrics URL of the Ray metrics agent of this process's node (Ray-prefixed names)."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        for n in ray.nodes():
            if n.get("NodeID") == node_id:
                return f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        return ""


# ----------------------------------------------------------------------------- training

class TrainMetrics:
    """What one training worker reports. Build with :meth:`create`; call ``close()`` at the end."""

    def __init__(self, sink: _Sink, *, backend: str, run: str, rank: int, trial: str = ""):
        self._sink, self.backend = sink, backend
        self.tags = {"run": run, "rank": str(rank), "trial": trial}
        self._cuda = None  # torch.cuda when this process uses a GPU, checked once
        self._sink.set("stylegen_build_info", 1.0, {**self.tags, "version": __version__,
                                                      "torch": _dist_version("torch"), "ray": _dist_version("ray")})
        self._sink.set("stylegen_train_running", 1.0, self.tags)
        self._sink.set("stylegen_train_start_timestamp_seconds", time.time(), self.tags)
        self._sink.inc("stylegen_train_samples_total", 0.0, self.tags)  # series exist from the start
        self._sink.inc("stylegen_worker_restarts_total", 0.0, self.tags)

    @classmethod
    def create(cls, backend: str, *, run: str, rank: int, trial: str = "", host: str = "127.0.0.1",
               port: int = 0) -> "TrainMetrics":
        """``backend``: "prometheus" (serve ``host:port``; 0 = free port), "ray" or "none"."""
        if backend == "prometheus":
            sink: _Sink = _ClientSink(TRAIN_SPECS, TRAIN_LABELS)
            self = cls(sink, backend=backend, run=run, rank=rank, trial=trial)
            sink.serve(host, port)
            return self
        if backend == "ray":
            return cls(_RaySink(TRAIN_SPECS, TRAIN_LABELS), backend=backend, run=run, rank=rank, trial=trial)
        if backend == "none":
            return cls(_NullSink(), backend=backend, run=run, rank=rank, trial=trial)
        raise UserError(f"unknown metrics backend {backend!r}: use one of {', '.join(BACKENDS)}")

    @property
    def url(self) -> str:
        """Where these metrics can be scraped: the local endpoint, this node's Ray agent, or ''."""
        if isinstance(self._sink, _ClientSink):
            return self._sink.url
        if isinstance(self._sink, _RaySink):
            return _RaySink.node_url()
        return ""

    def exposition(self) -> bytes:
        """The local backend's /metrics text (for tests and debugging); b'' for other backends."""
        if isinstance(self._sink, _ClientSink):
            from prometheus_client import generate_latest

            return generate_latest(self._sink.registry)
        return b""

    def step(self, duration_s: float, samples: int, data_wait_s: float, losses: dict[str, float]) -> None:
        """One finished step: ``duration_s`` is its wall time including ``data_wait_s``."""
        t = self.tags
        self._sink.inc("stylegen_train_steps_total", 1.0, t)
        self._sink.inc("stylegen_train_samples_total", float(samples), t)
        self._sink.inc("stylegen_train_step_seconds_total", max(duration_s, 0.0), t)
        self._sink.observe("stylegen_train_step_duration_seconds", max(duration_s, 0.0), t)
        self._sink.inc("stylegen_data_wait_seconds_total", max(data_wait_s, 0.0), t)
        for term, value in losses.items():
            value = float(value)
            self._sink.set("stylegen_train_loss", value, {**t, "term": term})
            self._sink.set("stylegen_train_loss_nonfinite", 0.0 if math.isfinite(value) else 1.0, {**t, "term": term})
        mem = self._device_memory()
        if mem is not None:
            self._sink.set("stylegen_device_memory_allocated_bytes", float(mem), t)

    def val(self, score: float) -> None:
        self._sink.set("stylegen_val_score", float(score), self.tags)

    def checkpoint_saved(self, duration_s: float) -> None:
        self._sink.observe("stylegen_checkpoint_save_duration_seconds", max(duration_s, 0.0), self.tags)
        self._sink.set("stylegen_checkpoint_last_success_timestamp_seconds", time.time(), self.tags)

    def worker_restart(self) -> None:
        self._sink.inc("stylegen_worker_restarts_total", 1.0, self.tags)

    def throughput(self, flops_per_s: float, mfu: float) -> None:
        self._sink.set("stylegen_train_flops_per_second", float(flops_per_s), self.tags)
        self._sink.set("stylegen_train_mfu_ratio", float(mfu), self.tags)

    def data_resumed(self, epoch: int, batch: int, seek_s: float) -> None:
        self._sink.set("stylegen_data_resume_position", float(epoch), {**self.tags, "field": "epoch"})
        self._sink.set("stylegen_data_resume_position", float(batch), {**self.tags, "field": "batch"})
        self._sink.set("stylegen_data_seek_seconds", max(seek_s, 0.0), self.tags)

    def close(self) -> None:
        """Mark the run finished and stop the local endpoint (idempotent)."""
        self._sink.set("stylegen_train_running", 0.0, self.tags)
        self._sink.close()
        self._sink = _NullSink()

    def __enter__(self) -> "TrainMetrics":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _device_memory(self) -> int | None:
        if self._cuda is None:
            torch = sys.modules.get("torch")  # never import torch just for this
            self._cuda = torch.cuda if torch is not None and torch.cuda.is_available() else False
        if not self._cuda or not self._cuda.is_initialized():
            return None
        return self._cuda.memory_allocated()


# ----------------------------------------------------------------------------- commands

class CommandMetrics:
    """Counters of the one-shot commands (shard, stylize) in a private registry.

    A command ends quickly, so besides serving ``/metrics`` while it runs (``serve``) it can
    leave its totals in a node-exporter textfile (``write_textfile``, written atomically).
    """

    def __init__(self, run: str = ""):
        self._sink = _ClientSink(COMMAND_SPECS, ("run",))
        self._tags = {"run": run}
        for result in SHARD_RESULTS:
            self._sink.inc("stylegen_shard_images_total", 0.0, {**self._tags, "result": result})

    def shard_images(self, result: str, n: int = 1) -> None:
        if result not in SHARD_RESULTS:
            raise ValueError(f"result must be one of {SHARD_RESULTS}, got {result!r}")
        self._sink.inc("stylegen_shard_images_total", float(n), {**self._tags, "result": result})

    def stylized(self, n: int = 1) -> None:
        self._sink.inc("stylegen_stylize_images_total", float(n), self._tags)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> str:
        return self._sink.serve(host, port)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self._sink.registry)

    def write_textfile(self, path: str) -> None:
        from prometheus_client import write_to_textfile  # temp file + rename

        write_to_textfile(path, self._sink.registry)

    def close(self) -> None:
        self._sink.close()


# ----------------------------------------------------------------------------- serving

class ServeMetrics:
    """What one ``stylegen serve`` replica reports (``SERVE_SPECS``); labels ``run``/``trial`` of its model."""

    def __init__(self, sink: _Sink, *, run: str, trial: str = ""):
        self._sink, self.tags = sink, {"run": run, "trial": trial}
        self._sink.inc("stylegen_serve_images_total", 0.0, self.tags)

    @classmethod
    def create(cls, backend: str, *, run: str, trial: str = "") -> "ServeMetrics":
        """``backend``: "ray" (a replica: Ray's metrics agent exports), "prometheus" (private registry, not
        served: ``exposition()`` for tests) or "none"."""
        if backend == "ray":
            return cls(_RaySink(SERVE_SPECS, SERVE_LABELS), run=run, trial=trial)
        if backend == "prometheus":
            return cls(_ClientSink(SERVE_SPECS, SERVE_LABELS), run=run, trial=trial)
        if backend == "none":
            return cls(_NullSink(), run=run, trial=trial)
        raise UserError(f"unknown metrics backend {backend!r}: use one of {', '.join(BACKENDS)}")

    def request(self, route: str, code: int, seconds: float) -> None:
        t = {**self.tags, "route": route}
        self._sink.inc("stylegen_serve_requests_total", 1.0, {**t, "code": str(code)})
        self._sink.observe("stylegen_serve_request_duration_seconds", max(seconds, 0.0), t)
        self._sink.inc("stylegen_serve_request_seconds_total", max(seconds, 0.0), t)

    def batch(self, size: int) -> None:
        self._sink.observe("stylegen_serve_batch_size", float(size), self.tags)

    def images(self, n: int = 1) -> None:
        self._sink.inc("stylegen_serve_images_total", float(n), self.tags)

    def error(self, reason: str) -> None:
        self._sink.inc("stylegen_serve_errors_total", 1.0, {**self.tags, "reason": reason})

    def exposition(self) -> bytes:
        if isinstance(self._sink, _ClientSink):
            from prometheus_client import generate_latest

            return generate_latest(self._sink.registry)
        return b""

    def close(self) -> None:
        self._sink.close()


def ray_node_metrics_url() -> str:
    """The /metrics URL of this node's Ray metrics agent (stylegen_* names carry a ray_ prefix there)."""
    return _RaySink.node_url()
