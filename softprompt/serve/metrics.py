"""Prometheus exposition of the engine's counters (requests, tokens, batch sizes, queue, cache)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        st = self.engine.status()
        cache = st["prefix_cache"]
        counters = {
            "requests": ("requests accepted into the queue", st["requests"]),
            "requests_completed": ("requests finished normally", st["completed"]),
            "requests_failed": ("requests finished with an error", st["errors"]),
            "requests_cancelled": ("requests cancelled (client gone or asked)", st["cancelled"]),
            "requests_refused_queue_full": ("requests refused because the queue was full", st["refused_queue_full"]),
            "generated_tokens": ("tokens generated", st["generated_tokens"]),
            "prompt_tokens": ("prompt tokens prefilled", st["prompt_tokens"]),
            "decode_steps": ("engine steps with running rows", st["steps"]),
            "batch_rows": ("sum over steps of the rows in the batch", st["batch_rows_sum"]),
            "engine_faults": ("engine steps that failed with no row to blame (their rows ended)", st.get("faults", 0)),
            "engine_restarts": ("times the engine loop died and was restarted", st.get("restarts", 0)),
            "prefix_cache_hits": ("task prefix cache hits", cache["hits"]),
            "prefix_cache_misses": ("task prefix cache misses (loads)", cache["misses"]),
            "prefix_cache_evictions": ("task prefixes evicted", cache["evictions"]),
        }
        for name, (doc, value) in counters.items():
            c = CounterMetricFamily(f"softprompt_{name}", doc)
            c.add_metric([], value)
            yield c
        gauges = {
            "running_rows": ("rows in the running batch", st["running_rows"]),
            "queue_length": ("requests waiting", st["waiting"]),
            "max_batch_size": ("batch size limit", st["max_batch_size"]),
            "max_queue": ("queue length limit", st["max_queue"]),
            "prefix_cache_tasks": ("task prefixes cached", cache["tasks"]),
            "prefix_cache_bytes": ("bytes of cached task prefixes", cache["bytes"]),
            "mean_batch_rows": ("mean rows per step so far", st["batch_rows_sum"] / max(1, st["steps"])),
            # over the latest 1024 loads (NaN before the first); loads run beside the decode loop
            "prefix_load_p50_ms": ("task prefix load time, p50 (ms)", _or_nan(cache.get("load_ms_p50"))),
            "prefix_load_p99_ms": ("task prefix load time, p99 (ms)", _or_nan(cache.get("load_ms_p99"))),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(f"softprompt_{name}", doc)
            g.add_metric([], value)
            yield g


def _or_nan(x) -> float:
    return float("nan") if x is None else float(x)


def render(engine) -> str:
    registry = CollectorRegistry()
    registry.register(_EngineCollector(engine))
    return generate_latest(registry).decode()
