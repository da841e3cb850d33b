"""`softprompt serve`: the engine plus the HTTP API over a prompt store, on uvicorn."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from softprompt.serve.config import ServeConfig


def _check_key(key: str, where: str) -> str:
    """A key is one token of printable ASCII (what an Authorization header can carry); anything else
    is a mistake in the file (a stray word, a pasted comment), refused rather than made a key."""
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError(f"{where}: an API key must be one word of printable ASCII characters")
    return key


# a key's line may name it after a '#': `sk-... # alice`; the access log shows the name, never the key
_NAMED = re.compile(r"(\S+)\s+#\s*(.*)")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


def read_key_file(api_keys_file: str) -> dict[str, str | None]:
    """key -> its name (None: unnamed) from a keys file: one key per line, optionally followed by
    `# NAME` (one word: letters, digits, `._@+-`); blank lines and lines starting with # after
    leading spaces are skipped."""
    try:
        text = Path(api_keys_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the API keys file {api_keys_file}: {e}") from e
    keys = {}
    for n, line in enumerate(text.splitlines(), 1):
        line, where = line.strip(), f"{api_keys_file} line {n}"
        if not line or line.startswith("#"):
            continue
        named = _NAMED.fullmatch(line)
        key, name = (named.group(1), named.group(2).strip()) if named else (line, None)
        if name is not None and not _NAME.fullmatch(name):
            raise ValueError(f"{where}: a key's name (after '#') must be one word of up to 64 letters, digits or "
                             "._@+- (it is shown in the access log)")
        keys[_check_key(key, where)] = name
    if not keys:
        raise ValueError(f"the API keys file {api_keys_file} holds no key")
    return keys


def read_api_keys(api_keys_file: str | None) -> frozenset[str]:
    """Bearer tokens from a file (see `read_key_file`) and/or $SOFTPROMPT_API_KEYS (comma-separated)."""
    keys = set(read_key_file(api_keys_file)) if api_keys_file else set()
    keys |= {_check_key(k.strip(), "$SOFTPROMPT_API_KEYS") for k in os.environ.get("SOFTPROMPT_API_KEYS", "").split(",")
             if k.strip()}
    return frozenset(keys)


def key_names(api_keys_file: str | None) -> tuple[tuple[str, str], ...]:
    """(fingerprint, name) of each key the file names (ServerConfig.api_key_names): no secret in it."""
    from softprompt.serve.access import key_id

    named = read_key_file(api_keys_file).items() if api_keys_file else ()
    return tuple(sorted((key_id(k), name) for k, name in named if name))


def build_app(cfg: ServeConfig | None = None, tasks: dict | None = None):
    """(app, config) for `cfg` (a ServeConfig: the store, the base as cfg.model, the limits as
    cfg.server); `tasks`: tasks held in memory beside the store's. With `cfg.model.lora`, the engine's
    model is the LoRA-adapted base: every task is checked against *its* fingerprint when loaded
    (`load_artifact` hashes the model it is given, and `apply_lora` drops any fingerprint cached for
    the bare weights), so prompts trained with that adapter are served and prompts trained on the
    bare base are refused per request (400)."""
    from softprompt.families import family_of
    from softprompt.io.load import EMBEDDED_NAME
    from softprompt.io.lora import load_base_with_lora
    from softprompt.serve.engines import engine_class
    from softprompt.serve.http import create_app
    from softprompt.serve.resolver import StoreResolver
    from softprompt.serve.tasks import TaskRegistry
    from softprompt.store.core import Store, StoreUnavailable

    cfg = cfg or ServeConfig()
    m, limits = cfg.model, cfg.server
    keys = read_api_keys(cfg.api_keys_file)  # a bad key file fails before the model loads
    model, tok = load_base_with_lora(m.base, m.lora, merge=m.merge_lora)
    store = Store(cfg.store) if cfg.store is not None else Store()

    # -> StoreEntry or None; a task whose file is gone is refused (not served from a cache), and an
    # unreachable shared index is ridden out with the tasks already held (resolver.py)
    from_store = StoreResolver(store)

    registry = TaskRegistry(tasks, fallback=from_store)
    if cfg.backend == "vllm":
        engine = _vllm_engine(cfg, model, tok, store, registry)
    else:
        Engine = engine_class(family_of(model))  # continuous batching for decoders, batch-at-a-time for T5/BART
        guard = {} if limits.off_task == "off" else {"off_task": limits.off_task}
        if guard and not getattr(Engine, "guards_off_task", False):  # the seq2seq engine has no guard
            if limits.off_task != "warn":
                raise ValueError(f"--off-task {limits.off_task} needs a decoder-only base (the guard is the decoder "
                                 "engine's)")
            guard = {}
        engine = Engine(model, tok, registry, max_batch_size=limits.max_batch_size, max_queue=limits.max_queue,
                        prefix_cache_bytes=limits.prefix_cache_mb << 20, **guard)
    base_id = EMBEDDED_NAME if m.base is None else Path(m.base).name
    if m.lora is not None:  # another model than the bare base: clients must not mistake one for the other
        base_id += f"+lora:{Path(m.lora).name}"
    if cfg.served_model_name is not None:  # the operator's name wins (a task of that name would be shadowed)
        base_id = cfg.served_model_name
    config = replace(limits, base_model_id=base_id, api_keys=keys, api_key_names=key_names(cfg.api_keys_file))
    app = create_app(engine, store, config)
    app.state.health_hooks.append(from_store.health)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    return app, config


def _vllm_engine(cfg: ServeConfig, model, tok, store, registry):
    """The engine of `--backend vllm`, its vLLM child started (and answering) before the app serves,
    so a failed start is one line from the command, not a traceback from the app's start-up."""
    from softprompt.families import family_of
    from softprompt.serve.vllm_backend import VllmEngine, VllmServer, vllm_options

    if family_of(model).name != "causal_lm":
        raise ValueError("--backend vllm serves decoder-only bases (our connector writes a decoder's KV prefix)")
    shared = not (store.root / "index.sqlite").is_file()  # a PostgreSQL index
    if shared and store.remote:
        raise ValueError("--backend vllm reads a shared store's bytes from a directory (?objects=DIR), not from an "
                         "object store (vLLM's connector opens the compiled prefixes as files)")
    ref = (cfg.store or os.environ.get("SOFTPROMPT_STORE")) if shared else None
    server = VllmServer(vllm_options(cfg, model, store.root, ref))
    limits = cfg.server
    engine = VllmEngine(model, tok, registry, server=server, max_batch_size=limits.max_batch_size,
                        max_queue=limits.max_queue, prefix_cache_bytes=limits.prefix_cache_mb << 20)
    print(f"starting vLLM ({server.opts.python}; log {server.log_path})", file=sys.stderr)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return engine


async def _store_unavailable(request, exc):
    """The shared store's index is down and the task is not held here: a retryable 503."""
    from softprompt.serve.errors import ErrorJSON
    from softprompt.serve.guard import error_body

    return ErrorJSON(error_body(str(exc), "service_unavailable", "store_unavailable"), 503,
                     headers={"Retry-After": "1"})


def serve(cfg: ServeConfig | None = None):
    """`softprompt serve`: every task in a prompt store over an OpenAI-compatible HTTP API (and the
    base model), per `cfg` (a ServeConfig; its docstring is the flags' help)."""
    import socket

    import uvicorn

    from softprompt.core.device import set_defaults, set_threads

    cfg = cfg or ServeConfig()
    m = cfg.model
    # With other busy processes on the cores, each small multi-threaded op waits for a descheduled
    # thread (measured: a decode step's attention 8 ms instead of 7 us); the default counts only free cores.
    set_defaults(m.device, m.dtype, m.quantize)
    set_threads(m.threads)
    if cfg.ray:
        from softprompt.serve.ray_app import run

        options = {k: v for k, v in cfg.options().items() if k not in ("store", "host", "port", "base", "replicas",
                                                                        "ray", "ray_address", "threads")}
        return run(cfg.store, cfg.host, cfg.port, m.base, cfg.replicas, cfg.ray_address, m.threads or 1, **options)
    # Bind before anything else: a busy port fails in a second, with one line and no "serving" banner.
    try:
        sock = socket.create_server((cfg.host, cfg.port), family=socket.AF_INET6 if ":" in cfg.host
                                    else socket.AF_INET)
    except (OSError, OverflowError) as e:
        raise ValueError(f"cannot listen on {cfg.host}:{cfg.port}: {getattr(e, 'strerror', None) or e}") from None
    host = cfg.host
    with sock:
        app, config = build_app(cfg)
        port = sock.getsockname()[1]
        auth = f"{len(config.api_keys)} API key(s)" if config.api_keys else "no API key"
        print(f"softprompt serving {config.base_model_id} and the tasks of the store on http://{host}:{port} "
              f"({auth}); OpenAI base_url http://{host}:{port}/v1", file=sys.stderr)
        if config.access_log:  # ours (serve/access.py: request id, key name, ms) replaces uvicorn's
            from softprompt.serve.access import to_stderr

            to_stderr()
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
