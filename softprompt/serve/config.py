"""The server's limits, each with its one default: `ServerConfig` (the HTTP layer's, serve/service.py)
and the engine's as `softprompt serve` sets them; serve/main.py takes its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """Every limit has a default."""

    base_model_id: str = "base"
    api_keys: frozenset[str] = frozenset()
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 64 << 20  # a task artifact uploaded over HTTP (routers/admin_tasks.py)
    body_timeout_s: float = 30.0  # a body not fully sent by then gets 408
    request_timeout_s: float = 120.0
    max_n: int = 8
    default_max_tokens: int = 16
    # the engine's, as `softprompt serve` builds it (serve/main.py)
    max_batch_size: int = 32  # rows decoded together
    max_queue: int = 256  # requests waiting beyond the batch; more get 429
    prefix_cache_mb: int = 256  # memory for cached task prefixes
