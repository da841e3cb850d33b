"""`softprompt serve`: the engine plus the HTTP API over a prompt store, on uvicorn."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def read_api_keys(api_keys_file: str | None) -> frozenset[str]:
    """Bearer tokens from a file (one per line, # comments) and/or $SOFTPROMPT_API_KEYS (comma-separated)."""
    keys = set()
    if api_keys_file:
        try:
            text = Path(api_keys_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read the API keys file {api_keys_file}: {e}") from e
        keys |= {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
        if not keys:
            raise ValueError(f"the API keys file {api_keys_file} holds no key")
    keys |= {k.strip() for k in os.environ.get("SOFTPROMPT_API_KEYS", "").split(",") if k.strip()}
    return frozenset(keys)


def build_app(store_dir: str | None = None, base: str | None = None, api_keys_file: str | None = None,
              max_batch_size: int = 32, max_queue: int = 256, max_body_bytes: int = 1 << 20,
              request_timeout_s: float = 120.0, prefix_cache_mb: int = 256, tasks: dict | None = None,
              lora: str | None = None, merge_lora: bool = True):
    """(app, config). With `lora`, the engine's model is the LoRA-adapted base: every task is checked
    against *its* fingerprint when loaded (`load_artifact` hashes the model it is given, and
    `apply_lora` drops any fingerprint cached for the bare weights), so prompts trained with that
    adapter are served and prompts trained on the bare base are refused per request (400)."""
    from ..lora import load_base_with_lora
    from ..models import EMBEDDED_NAME, is_seq2seq
    from ..store import Store
    from .engine import Engine
    from .http import ServerConfig, create_app
    from .tasks import TaskRegistry

    model, tok = load_base_with_lora(base, lora, merge=merge_lora)
    store = Store(store_dir) if store_dir is not None else Store()

    def from_store(name: str):  # -> StoreEntry (loads through the index check) or None
        try:
            return store.entry(name)
        except Exception:  # a malformed name is as unknown as a missing one
            return None

    if is_seq2seq(model):  # T5, BART: seq2seq prompts, batch-at-a-time engine
        from .seq2seq import Seq2SeqEngine as Engine
    engine = Engine(model, tok, TaskRegistry(tasks, fallback=from_store), max_batch_size=max_batch_size,
                    max_queue=max_queue, prefix_cache_bytes=prefix_cache_mb << 20)
    base_id = EMBEDDED_NAME if base is None else Path(base).name
    if lora is not None:  # another model than the bare base: clients must not mistake one for the other
        base_id += f"+lora:{Path(lora).name}"
    config = ServerConfig(base_model_id=base_id, api_keys=read_api_keys(api_keys_file),
                          max_body_bytes=max_body_bytes, request_timeout_s=request_timeout_s)
    return create_app(engine, store, config), config


def serve(store: str | None = None, host: str = "127.0.0.1", port: int = 8000, base: str | None = None,
          api_keys_file: str | None = None, max_batch_size: int = 32, max_queue: int = 256,
          max_body_bytes: int = 1 << 20, request_timeout_s: float = 120.0, prefix_cache_mb: int = 256,
          lora: str | None = None, merge_lora: bool = True, threads: int = 0):
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
    """
    import uvicorn

    from ..device import set_threads

    # With other busy processes on the cores, each small multi-threaded op waits for a descheduled
    # thread (measured: a decode step's attention 8 ms instead of 7 us); the default counts only free cores.
    set_threads(threads)

    app, config = build_app(store, base, api_keys_file, max_batch_size, max_queue, max_body_bytes,
                            request_timeout_s, prefix_cache_mb, lora=lora, merge_lora=merge_lora)
    auth = f"{len(config.api_keys)} API key(s)" if config.api_keys else "no API key"
    print(f"softprompt serving {config.base_model_id} and the tasks of the store on http://{host}:{port} "
          f"({auth}); OpenAI base_url http://{host}:{port}/v1", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
