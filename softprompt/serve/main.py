"""`softprompt serve`: the engine plus the HTTP API over a prompt store, on uvicorn."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from softprompt.serve.config import ServerConfig

LIMITS = ServerConfig()  # every limit's default, in one place (serve/config.py)


def _check_key(key: str, where: str) -> str:
    """A key is one token of printable ASCII (what an Authorization header can carry); anything else
    is a mistake in the file (a stray word, a pasted comment), refused rather than made a key."""
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError(f"{where}: an API key must be one word of printable ASCII characters")
    return key


def read_api_keys(api_keys_file: str | None) -> frozenset[str]:
    """Bearer tokens from a file (one per line; blank lines and lines starting with # after leading
    spaces are skipped) and/or $SOFTPROMPT_API_KEYS (comma-separated)."""
    keys = set()
    if api_keys_file:
        try:
            text = Path(api_keys_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the API keys file {api_keys_file}: {e}") from e
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                keys.add(_check_key(line, f"{api_keys_file} line {n}"))
        if not keys:
            raise ValueError(f"the API keys file {api_keys_file} holds no key")
    keys |= {_check_key(k.strip(), "$SOFTPROMPT_API_KEYS") for k in os.environ.get("SOFTPROMPT_API_KEYS", "").split(",")
             if k.strip()}
    return frozenset(keys)


def build_app(store_dir: str | None = None, base: str | None = None, api_keys_file: str | None = None,
              max_batch_size: int = LIMITS.max_batch_size, max_queue: int = LIMITS.max_queue,
              max_body_bytes: int = LIMITS.max_body_bytes, request_timeout_s: float = LIMITS.request_timeout_s,
              prefix_cache_mb: int = LIMITS.prefix_cache_mb, tasks: dict | None = None,
              lora: str | None = None, merge_lora: bool = True, body_timeout_s: float = LIMITS.body_timeout_s,
              served_model_name: str | None = None, max_upload_bytes: int = LIMITS.max_upload_bytes):
    """(app, config). With `lora`, the engine's model is the LoRA-adapted base: every task is checked
    against *its* fingerprint when loaded (`load_artifact` hashes the model it is given, and
    `apply_lora` drops any fingerprint cached for the bare weights), so prompts trained with that
    adapter are served and prompts trained on the bare base are refused per request (400)."""
    from softprompt.families import family_of
    from softprompt.io.load import EMBEDDED_NAME
    from softprompt.io.lora import load_base_with_lora
    from softprompt.serve.engines import engine_class
    from softprompt.serve.http import create_app
    from softprompt.serve.resolver import StoreResolver
    from softprompt.serve.tasks import TaskRegistry
    from softprompt.store.core import Store, StoreUnavailable

    keys = read_api_keys(api_keys_file)  # a bad key file fails before the model loads
    model, tok = load_base_with_lora(base, lora, merge=merge_lora)
    store = Store(store_dir) if store_dir is not None else Store()

    # -> StoreEntry or None; a task whose file is gone is refused (not served from a cache), and an
    # unreachable shared index is ridden out with the tasks already held (resolver.py)
    from_store = StoreResolver(store)

    Engine = engine_class(family_of(model))  # continuous batching for decoders, batch-at-a-time for T5/BART
    engine = Engine(model, tok, TaskRegistry(tasks, fallback=from_store), max_batch_size=max_batch_size,
                    max_queue=max_queue, prefix_cache_bytes=prefix_cache_mb << 20)
    base_id = EMBEDDED_NAME if base is None else Path(base).name
    if lora is not None:  # another model than the bare base: clients must not mistake one for the other
        base_id += f"+lora:{Path(lora).name}"
    if served_model_name is not None:  # the operator's name wins (a task of that name would be shadowed)
        base_id = served_model_name
    config = ServerConfig(base_model_id=base_id, api_keys=keys,
                          max_body_bytes=max_body_bytes, request_timeout_s=request_timeout_s,
                          body_timeout_s=body_timeout_s, max_upload_bytes=max_upload_bytes,
                          max_batch_size=max_batch_size, max_queue=max_queue, prefix_cache_mb=prefix_cache_mb)
    app = create_app(engine, store, config)
    app.state.health_hooks.append(from_store.health)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    return app, config


async def _store_unavailable(request, exc):
    """The shared store's index is down and the task is not held here: a retryable 503."""
    from softprompt.serve.errors import ErrorJSON
    from softprompt.serve.guard import error_body

    return ErrorJSON(error_body(str(exc), "service_unavailable", "store_unavailable"), 503,
                     headers={"Retry-After": "1"})


def serve(store: str | None = None, host: str = "127.0.0.1", port: int = 8000, base: str | None = None,
          api_keys_file: str | None = None, max_batch_size: int = LIMITS.max_batch_size,
          max_queue: int = LIMITS.max_queue, max_body_bytes: int = LIMITS.max_body_bytes,
          request_timeout_s: float = LIMITS.request_timeout_s, prefix_cache_mb: int = LIMITS.prefix_cache_mb,
          lora: str | None = None, merge_lora: bool = True, threads: int = 0,
          body_timeout_s: float = LIMITS.body_timeout_s, ray: bool = False, replicas: int = 1,
          ray_address: str | None = None, served_model_name: str | None = None,
          max_upload_bytes: int = LIMITS.max_upload_bytes):
    """Serve every task in a prompt store over an OpenAI-compatible HTTP API (and the base model).

    Args:
        store: the prompt store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
        host: address to bind; 127.0.0.1 keeps the server local (use 0.0.0.0 to expose it, with API keys)
        port: TCP port
        base: a local HuggingFace model directory (default: the embedded model)
        api_keys_file: file of bearer tokens, one per line; $SOFTPROMPT_API_KEYS (comma-separated) adds more
        max_batch_size: rows decoded together
        max_queue: requests waiting beyond the batch; more get 429
        max_body_bytes: request bodies over this get 413
        request_timeout_s: a request running longer gets 504
        prefix_cache_mb: memory for cached task prefixes
        lora: a PEFT LoRA adapter directory (safetensors) applied to the base first: serves prompts trained with --lora
        merge_lora: merge the LoRA weights into the base (--no-merge-lora keeps LoRA layers)
        threads: torch CPU threads (0: the cores not busy with other processes, see docs/devices.md)
        body_timeout_s: a request body not fully received within this many seconds gets 408
        ray: serve on Ray Serve (replicas over one shared store, e.g. --store postgresql://...; docs/distributed.md)
        replicas: with --ray: engine replicas (each holds the model once)
        ray_address: with --ray: join this Ray cluster (e.g. auto) instead of starting a local one
        served_model_name: the base model's id in the API (default: the base directory's name, or SmolLM2-135M-Instruct)
        max_upload_bytes: a task uploaded over HTTP (POST /v1/tasks/NAME) over this gets 413
    """
    import socket

    import uvicorn

    from softprompt.core.device import set_threads

    # With other busy processes on the cores, each small multi-threaded op waits for a descheduled
    # thread (measured: a decode step's attention 8 ms instead of 7 us); the default counts only free cores.
    set_threads(threads)

    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    for name, value in (("max_batch_size", max_batch_size), ("max_body_bytes", max_body_bytes),
                        ("prefix_cache_mb", prefix_cache_mb), ("request_timeout_s", request_timeout_s),
                        ("body_timeout_s", body_timeout_s), ("max_upload_bytes", max_upload_bytes)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if served_model_name is not None and not 0 < len(served_model_name) <= 256:
        raise ValueError("served_model_name must be 1 to 256 characters")
    if ray:
        from softprompt.serve.ray_app import run

        return run(store, host, port, base, replicas, ray_address, threads or 1, api_keys_file=api_keys_file,
                   max_batch_size=max_batch_size, max_queue=max_queue, max_body_bytes=max_body_bytes,
                   request_timeout_s=request_timeout_s, prefix_cache_mb=prefix_cache_mb, lora=lora,
                   merge_lora=merge_lora, served_model_name=served_model_name, max_upload_bytes=max_upload_bytes)
    # Bind before anything else: a busy port fails in a second, with one line and no "serving" banner.
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except (OSError, OverflowError) as e:
        raise ValueError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    with sock:
        app, config = build_app(store, base, api_keys_file, max_batch_size, max_queue, max_body_bytes,
                                request_timeout_s, prefix_cache_mb, lora=lora, merge_lora=merge_lora,
                                body_timeout_s=body_timeout_s, served_model_name=served_model_name,
                                max_upload_bytes=max_upload_bytes)
        port = sock.getsockname()[1]
        auth = f"{len(config.api_keys)} API key(s)" if config.api_keys else "no API key"
        print(f"softprompt serving {config.base_model_id} and the tasks of the store on http://{host}:{port} "
              f"({auth}); OpenAI base_url http://{host}:{port}/v1", file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
