"""The server's limits, each with its one default: `ServerConfig` (the HTTP layer's, serve/service.py)
and the engine's as `softprompt serve` sets them; and `ServeConfig`, all of `softprompt serve`'s
options (where to listen, the store, the base as a `ModelConfig`, the limits as a `ServerConfig`):
what serve/main.py's `serve` and `build_app` take, and what the command line builds its flags from."""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields

from softprompt.core.defaults import ModelConfig, config_of


OFF_TASK_POLICIES = ("warn", "reject", "base", "off")
BACKENDS = ("torch", "vllm")  # what decodes: our engine, or vLLM as a child process (serve/vllm_backend.py)


@dataclass(frozen=True)
class ServerConfig:
    """Every limit has a default."""

    base_model_id: str = "base"
    api_keys: frozenset[str] = frozenset()
    api_key_names: tuple[tuple[str, str], ...] = ()  # (access.key_id(key), name) for keys the keys file names
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
    # one line per request on the "softprompt.access" logger (serve/access.py); uvicorn's own is off
    access_log: bool = True
    # governance (store/approvals.py, store/trail.py): serve only approved store versions, their
    # approvals signed by one of these public keys when any is given; record each request in the store
    require_approved: bool = False
    trust_keys: tuple[str, ...] = ()
    trail: bool = True  # only where there is a store (softprompt serve always has one)
    trail_max_rows: int = 1_000_000
    # the off-task guard (core/offtask.py): past a task's calibrated threshold, "warn" only reports the
    # score (header and body), "reject" answers 422 before decoding, "base" serves the bare model; "off":
    # no score. Tasks without a summary are never scored.
    off_task: str = "warn"

    def __post_init__(self):
        # a list from the command line or a config file: a tuple, so the config stays hashable
        object.__setattr__(self, "trust_keys", tuple(str(k) for k in self.trust_keys or ()))  # None: not given


@dataclass(frozen=True)
class ServeConfig:
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
        access_log: a line per request on stderr (method, path, status, ms, request id, key name; no secret or prompt)
        require_approved: serve only store versions approved with `store approve` (others: 403 task_not_approved)
        trust_key: a PEM Ed25519 public key (repeatable): approvals must be signed by one, over the artifact as stored
        trail: record each request (id, key name, task@version, checksum, status, tokens; no text) in the store
        trail_max_rows: the audit trail keeps this many newest rows (older ones are deleted)
        off_task: past a task's off-task threshold (docs/offtask.md): warn (report the score), reject (422), base (serve the bare model), off
        backend: what decodes: torch (our engine) or vllm (vLLM's CPU or GPU build as a child process, with our KV connector; docs/vllm.md)
        vllm_python: with --backend vllm: the Python of vLLM's venv (default: $SOFTPROMPT_VLLM_PYTHON or .venv-vllm/bin/python)
        vllm_max_model_len: with --backend vllm: positions per request (placeholders, prompt and new tokens), at most the model's
        vllm_startup_timeout_s: with --backend vllm: how long vLLM may take to start (minutes on 2 CPU cores)
    """

    store: str | None = None  # a directory or a postgresql:// DSN; None: $SOFTPROMPT_STORE or the default
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: str | None = None
    served_model_name: str | None = None  # None: the base directory's name (+lora:NAME)
    ray: bool = False
    replicas: int = 1
    ray_address: str | None = None
    backend: str = "torch"
    vllm_python: str | None = None
    vllm_max_model_len: int = 2048
    vllm_startup_timeout_s: float = 900.0
    model: ModelConfig = ModelConfig()
    server: ServerConfig = ServerConfig()  # the limits; its base_model_id and api_keys are set by build_app
    # `softprompt serve`'s flags, in --help's order: a field, or a section's field (cli.py builds them)
    OPTIONS: typing.ClassVar = ("store", "host", "port", "model.base", "api_keys_file", "server.max_batch_size",
                                "server.max_queue", "server.max_body_bytes", "server.request_timeout_s",
                                "server.prefix_cache_mb", "model.lora", "model.merge_lora", "model.threads",
                                "server.body_timeout_s", "ray", "replicas", "ray_address", "served_model_name",
                                "server.max_upload_bytes", "model.device", "model.dtype", "model.quantize",
                                "server.access_log", "server.require_approved", "server.trust_keys", "server.trail",
                                "server.trail_max_rows", "server.off_task", "backend", "vllm_python",
                                "vllm_max_model_len", "vllm_startup_timeout_s")
    FLAG_NAMES: typing.ClassVar = {"server.trust_keys": "trust_key"}
    POSITIONAL: typing.ClassVar = ()

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_batch_size", "max_body_bytes", "prefix_cache_mb", "request_timeout_s", "body_timeout_s",
                     "max_upload_bytes"):
            if getattr(self.server, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self.server, name)}")
        if self.server.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.server.max_queue}")
        if self.server.trust_keys and not self.server.require_approved:
            raise ValueError("--trust-key checks approvals: it needs --require-approved")
        if self.server.off_task not in OFF_TASK_POLICIES:
            raise ValueError(f"off_task must be one of {', '.join(OFF_TASK_POLICIES)}, got {self.server.off_task!r}")
        if self.server.trail_max_rows <= 0:
            raise ValueError(f"trail_max_rows must be positive, got {self.server.trail_max_rows}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "vllm":
            why = ("--ray" if self.ray else "--lora" if self.model.lora else
                   f"--quantize {self.model.quantize}" if self.model.quantize not in (None, "none") else None)
            if why:
                raise ValueError(f"--backend vllm does not take {why} (vLLM runs the base as it is; docs/vllm.md)")
            if self.server.off_task in ("reject", "base"):
                raise ValueError(f"--off-task {self.server.off_task} needs --backend torch (the guard is our engine's)")
            if self.vllm_max_model_len <= 0 or self.vllm_startup_timeout_s <= 0:
                raise ValueError("vllm_max_model_len and vllm_startup_timeout_s must be positive")
        if self.served_model_name is not None and not 0 < len(self.served_model_name) <= 256:
            raise ValueError("served_model_name must be 1 to 256 characters")

    @classmethod
    def of(cls, **options) -> "ServeConfig":
        """From flat names, as the flags: `ServeConfig.of(store="s", base="b", max_batch_size=8, lora="l")`."""
        return config_of(cls, options)

    def options(self) -> dict:
        """The flat options that differ from their defaults (what `of` takes back): Ray's replicas get these."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("model", "server"):
                out.update({g.name: getattr(value, g.name) for g in fields(value)
                            if getattr(value, g.name) != g.default})
            elif value != f.default:
                out[f.name] = value
        return out
