"""Prometheus exposition of the engine's counters (requests, tokens, batch sizes, queue, cache)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

C, G = CounterMetricFamily, GaugeMetricFamily
METRICS = [  # (name after softprompt_, kind, help, where: a key of engine.status(), "cache." one of its prefix_cache)
    ("requests", C, "requests accepted into the queue", "requests"),
    ("requests_completed", C, "requests finished normally", "completed"),
    ("requests_failed", C, "requests finished with an error", "errors"),
    ("requests_cancelled", C, "requests cancelled (client gone or asked)", "cancelled"),
    ("requests_refused_queue_full", C, "requests refused because the queue was full", "refused_queue_full"),
    ("generated_tokens", C, "tokens generated", "generated_tokens"),
    ("prompt_tokens", C, "prompt tokens prefilled", "prompt_tokens"),
    ("decode_steps", C, "engine steps with running rows", "steps"),
    ("batch_rows", C, "sum over steps of the rows in the batch", "batch_rows_sum"),
    ("engine_faults", C, "engine steps that failed with no row to blame (their rows ended)", "faults"),
    ("engine_restarts", C, "times the engine loop died and was restarted", "restarts"),
    ("prefix_cache_hits", C, "task prefix cache hits", "cache.hits"),
    ("prefix_cache_misses", C, "task prefix cache misses (loads)", "cache.misses"),
    ("prefix_cache_evictions", C, "task prefixes evicted", "cache.evictions"),
    ("running_rows", G, "rows in the running batch", "running_rows"),
    ("queue_length", G, "requests waiting", "waiting"),
    ("max_batch_size", G, "batch size limit", "max_batch_size"),
    ("max_queue", G, "queue length limit", "max_queue"),
    ("prefix_cache_tasks", G, "task prefixes cached", "cache.tasks"),
    ("prefix_cache_bytes", G, "bytes of cached task prefixes", "cache.bytes"),
    ("mean_batch_rows", G, "mean rows per step so far", "mean_batch_rows"),
    # over the latest 1024 loads (NaN before the first); loads run beside the decode loop
    ("prefix_load_p50_ms", G, "task prefix load time, p50 (ms)", "cache.load_ms_p50"),
    ("prefix_load_p99_ms", G, "task prefix load time, p99 (ms)", "cache.load_ms_p99"),
]


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        st = self.engine.status()
        st["mean_batch_rows"] = st["batch_rows_sum"] / max(1, st["steps"])
        cache = st["prefix_cache"]
        for name, kind, doc, where in METRICS:
            value = cache.get(where[6:]) if where.startswith("cache.") else st.get(where, 0)
            m = kind(f"softprompt_{name}", doc)
            m.add_metric([], float("nan") if value is None else value)
            yield m


def render(engine) -> str:
    registry = CollectorRegistry()
    registry.register(_EngineCollector(engine))
    return generate_latest(registry).decode()
