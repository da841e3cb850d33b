"""`softprompt serve --backend vllm`: our HTTP layer (OpenAI routes, the store, keys, approvals, the
trail; `model` = task) in front of vLLM, which runs as a child process in its own venv
(.venv-vllm: vLLM pins its own transformers, docs/vllm.md) with our KV connector.

    client --HTTP--> our routes --Request--> VllmEngine --token ids, streamed--> `vllm serve` child
                                                              (connector writes the task's prefix)

The engine keeps what the routes rely on (submit -> Handle, the queue limit, status, tasks, the
tokenizer) and hands decoding to vLLM, one streamed completion per request, with
`max_batch_size` in flight (vLLM batches them; `--max-num-seqs` is the same number):

- A task is resolved through the engine's TaskRegistry (approvals apply as in the torch engine),
  its compiled prefix made sure of in the store for this base and dtype (compiled, or recompiled
  when damaged, by the store's own `kv_prefix`), and the request's prompt becomes the task's
  placeholder ids (core/placeholders.py) followed by the prompt's token ids.
- The request names its task in `kv_transfer_params`, so the connector re-reads the index for a
  task published a moment ago, and fails the request (never runs the placeholders as tokens) when
  it cannot write the prefix.
- Sampling fields go over with vLLM's meaning; what cannot (prompt logprobs, a repetition penalty on
  a task, whose placeholders vLLM would count as prompt tokens) is a 400 naming the field.
- vLLM's own 4xx answers end the request as a 400 with vLLM's message; a child that dies fails the
  requests it was running (500), is restarted, and /health answers 503 until it is back.

The store is a directory, or a shared store whose PostgreSQL index the connector reads too, with its
bytes in a directory vLLM can read (objects in S3 are not read by the connector).

Tasks held only in memory (not in the store) cannot reach vLLM's connector and are refused (400).
The off-task guard is the torch engine's (a hook in its prefill) and does not run here.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from softprompt.core.geometry import model_fingerprint
from softprompt.core.placeholders import placeholder_ids
from softprompt.serve.base import BaseEngine, Row, fault
from softprompt.serve.handle import Handle, Request, TokenLogprob
from softprompt.serve.tasks import RequestError, Task, TaskRefused, compile_task

log = logging.getLogger("softprompt.serve")

PYTHON_ENV = "SOFTPROMPT_VLLM_PYTHON"


class BackendUnavailable(RequestError):
    """vLLM is not answering (starting, restarting, or gone): retry later (503)."""

    code = "backend_unavailable"


def find_vllm_python(given: str | None = None) -> Path:
    """The Python of vLLM's environment: `given`, $SOFTPROMPT_VLLM_PYTHON, or .venv-vllm/bin/python in
    the current directory or beside this package's checkout (what scripts/setup-vllm.sh makes)."""
    if given or os.environ.get(PYTHON_ENV):
        candidates = [Path(given or os.environ[PYTHON_ENV])]
    else:
        candidates = [Path.cwd() / ".venv-vllm" / "bin" / "python",
                      Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    where = given or os.environ.get(PYTHON_ENV) or ".venv-vllm/bin/python"
    raise ValueError(f"--backend vllm needs vLLM's environment and found no Python at {where}: run "
                     "bash scripts/setup-vllm.sh, or pass --vllm-python PATH (docs/vllm.md)")


@dataclass(frozen=True)
class VllmOptions:
    """How the child `vllm serve` runs. `command`: what to run in place of `PYTHON -m
    vllm.entrypoints.openai.api_server` (its arguments are appended; tests run a stand-in)."""

    python: Path
    model_dir: Path
    dtype: str  # "float32", "bfloat16", ...: the compiled prefixes' dtype too
    store_root: Path  # the store's files (a shared store's objects directory)
    base_fingerprint: str
    max_model_len: int
    max_num_seqs: int
    startup_timeout_s: float = 900.0
    block_size: int | None = None
    extra_args: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    env: dict = field(default_factory=dict)
    store_ref: str | None = None  # what the connector opens: a shared store's DSN; None: store_root


class VllmServer:
    """The child `vllm serve` on a free local port: started, health-checked, stopped, restarted.
    Its output goes to a log file; the last lines are in the error when it fails to start."""

    def __init__(self, opts: VllmOptions):
        self.opts = opts
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.starts = 0
        self._dir = Path(tempfile.mkdtemp(prefix="softprompt-vllm-"))
        self.log_path = self._dir / "vllm.log"

    def args(self, port: int) -> list[str]:
        o = self.opts
        kv = {"kv_connector": "SoftpromptConnector", "kv_role": "kv_consumer",
              "kv_connector_module_path": "softprompt.vllm.connector",
              "kv_connector_extra_config": {"store": o.store_ref or str(o.store_root),
                                            "base_fingerprint": o.base_fingerprint,
                                            "dtype": o.dtype}}
        head = list(o.command) if o.command else [str(o.python), "-m", "vllm.entrypoints.openai.api_server"]
        args = [*head, "--model", str(o.model_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", o.dtype,
                "--max-model-len", str(o.max_model_len), "--max-num-seqs", str(o.max_num_seqs),
                "--enable-prefix-caching", "--disable-uvicorn-access-log", "--kv-transfer-config", json.dumps(kv)]
        if o.block_size:
            args += ["--block-size", str(o.block_size)]
        return args + list(o.extra_args)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the child and wait until it answers /health; ValueError (one line, with the end of
        its log) when it exits or does not come up within the timeout."""
        self.stop()
        with socket.socket() as s:  # a free port; vLLM binds it a moment later
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **self.opts.env}
        env.pop("PYTHONPATH", None)  # our venv's paths would shadow vLLM's own packages
        env.pop("VIRTUAL_ENV", None)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.args(self.port), stdout=out, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + self.opts.startup_timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise ValueError(f"vLLM exited with code {self.proc.returncode} while starting: {self.tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise ValueError(f"vLLM did not answer /health within {self.opts.startup_timeout_s:.0f} s: {self.tail()}")

    def healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(ln.strip() for ln in text[-lines:]) + f" (log: {self.log_path})"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)  # vLLM's engine core is a child of the server: the whole group
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@dataclass
class _VllmPrefix:
    """What the engine caches per task version: the placeholder ids that name it to the connector."""

    placeholders: list[int]
    sha256: str
    ref: str
    nbytes: int = 64


def sampling_body(req: Request, params) -> dict:
    """vLLM's completion fields for a request (OpenAI's and vLLM's own, with their meaning)."""
    body = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k or -1, "min_p": params.min_p, "seed": params.seed, "stop": list(params.stop),
            "stop_token_ids": list(params.stop_token_ids), "ignore_eos": params.ignore_eos,
            "include_stop_str_in_output": params.include_stop_str_in_output, "min_tokens": params.min_tokens,
            "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
            "repetition_penalty": params.repetition_penalty, "skip_special_tokens": True}
    if params.logit_bias:
        body["logit_bias"] = {str(t): b for t, b in params.logit_bias}
    if params.allowed_token_ids is not None:
        body["allowed_token_ids"] = list(params.allowed_token_ids)
    if req.bad_words:
        body["bad_words"] = list(req.bad_words)
    if req.logprobs is not None:
        body.update(logprobs=req.logprobs, return_tokens_as_token_ids=True)
    c = req.structured
    if c is not None:
        if c.options:
            raise RequestError(f"{c.param}: JSON whitespace options are not served by --backend vllm")
        spec = json.loads(c.spec) if c.kind in ("json", "choice") else c.spec
        body["structured_outputs"] = {c.kind: spec}
    return {k: v for k, v in body.items() if v is not None}


class VllmEngine(BaseEngine):
    """BaseEngine's queue and handles; decoding by the vLLM child (see the module docstring)."""

    thread_name = "softprompt-vllm-engine"
    prompt_logprobs = False
    guards_off_task = False

    def __init__(self, model, tokenizer, tasks=None, *, server: VllmServer, max_batch_size: int = 32,
                 max_queue: int = 1024, max_new_tokens_limit: int = 2048, prefix_cache_bytes: int = 256 * 2**20):
        super().__init__(model, tokenizer, tasks, max_batch_size=max_batch_size, max_queue=max_queue,
                         max_new_tokens_limit=max_new_tokens_limit, prefix_cache_bytes=prefix_cache_bytes)
        self.server = server
        self.max_positions = server.opts.max_model_len  # placeholders + prompt + new tokens (vLLM's limit)
        self._pool = ThreadPoolExecutor(max_workers=max_batch_size, thread_name_prefix="softprompt-vllm-stream")
        self._restarting = threading.Lock()
        self._ready = False  # the child answered /health since it was (re)started
        self.stats.update(vllm_restarts=0)

    # ---- the child's life --------------------------------------------------------------------
    def start(self):
        if not self.server.alive:
            self.server.start()  # blocking: the app serves once vLLM answers (minutes on 2 cores)
        self._ready = True
        return super().start()

    def stop(self) -> None:
        super().stop()
        self.server.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def revive(self) -> bool:
        """The loop as BaseEngine revives it, and the vLLM child: one that died is restarted in the
        background (the requests it ran have failed with it); False until it answers again. Cheap (a
        process poll): submit calls it for every request."""
        loop = super().revive()
        if not self._wanted:
            return loop
        if self._ready and self.server.alive:
            return loop
        if self._restarting.acquire(blocking=False):
            self._ready = False
            threading.Thread(target=self._restart, name="softprompt-vllm-restart", daemon=True).start()
        return False

    def _restart(self) -> None:
        try:
            log.error("vLLM is not running (%s); restarting it", self.server.tail(1))
            self.stats["vllm_restarts"] += 1
            self.server.start()
            self._ready = True
        except Exception as e:  # noqa: BLE001 - logged; the next request or /health tries again
            log.error("vLLM did not restart: %s", e)
        finally:
            self._restarting.release()

    def status(self) -> dict:
        return {**super().status(), "backend": "vllm", "vllm_alive": self.server.alive,
                "vllm_port": self.server.port, "vllm_log": str(self.server.log_path)}

    # ---- requests ----------------------------------------------------------------------------
    def _compile(self, task: Task) -> _VllmPrefix:
        """Make sure the store holds the task's compiled prefix for this base and dtype (the store's
        `kv_prefix` reads it, or compiles, repairs and publishes it), and name it by placeholders."""
        src = task.source
        if not all(hasattr(src, a) for a in ("sha256", "store", "kv_prefix")):
            raise TaskRefused(f"task {task.name!r} is not in the store: --backend vllm serves store tasks only "
                              "(vLLM's connector reads their compiled prefixes there; softprompt store add)")
        if str(src.store.root) != str(self.server.opts.store_root):
            raise TaskRefused(f"task {task.name!r} is in another store than the one vLLM reads")
        writes = src.store.compiled_write_errors
        prefix = compile_task(task, self.model)
        if src.store.compiled_write_errors != writes:
            raise TaskRefused(f"task {task.name!r}: its compiled prefix could not be written to the store, "
                              "where vLLM reads it")
        P = prefix.kv().shape[3]
        return _VllmPrefix(placeholder_ids(src.sha256, P, self.vocab_size), src.sha256, f"{src.name}@{src.version}")

    def _body(self, handle: Handle, req: Request) -> tuple[dict, Row]:
        """(vLLM's request body, the request's row: its sampling and the prompt's own token count), or
        RequestError."""
        if req.prompt_logprobs:
            raise RequestError("echo with logprobs (the prompt's logprobs) is not served by --backend vllm")
        params, prefix, ids = self._prepare_common(req, add_special_tokens=False)
        head = [] if prefix is None else prefix.placeholders
        if head and params.repetition_penalty != 1.0:
            raise RequestError("repetition_penalty on a task is not served by --backend vllm (vLLM would count "
                               "the task's placeholder ids as prompt tokens); use presence_penalty or "
                               "frequency_penalty, which count only new tokens")
        if self.max_positions and len(head) + len(ids) + params.max_new_tokens > self.max_positions:
            raise RequestError(f"prompt of {len(ids)} tokens + prefix of {len(head)} + max_new_tokens "
                               f"{params.max_new_tokens} exceeds the context of {self.max_positions}",
                               code="prompt_too_long")
        body = {"model": str(self.server.opts.model_dir), "prompt": head + ids, "stream": True,
                "return_token_ids": True, **sampling_body(req, params)}
        if prefix is not None:
            body["kv_transfer_params"] = {"softprompt": {"task": prefix.ref, "sha256": prefix.sha256,
                                                         "num_virtual_tokens": len(head)}}
        return body, Row(handle, params, len(ids))

    def step(self) -> bool:
        """Hand waiting requests to vLLM while fewer than max_batch_size are in flight."""
        with self._lock:
            self._cancel_waiting()
            free = self.max_batch_size - len(self._rows)
            if not self._waiting or free <= 0:
                return False
            taken = self._take_ready(free)
        for handle, req in taken:
            try:
                body, row = self._body(handle, req)
                if not (self._ready and self.server.alive):
                    raise BackendUnavailable("vLLM is restarting; retry in a moment")
            except RequestError as e:
                self._fail(handle, e)
                continue
            except Exception as e:  # noqa: BLE001 - this request's own failure (a load, a tokenizer)
                log.exception("preparing a request for vLLM failed")
                self._fail(handle, fault("preparing the request", e))
                continue
            with self._lock:
                self._rows.append(row)
                self.stats["prompt_tokens"] += row.prompt_tokens
            self._pool.submit(self._run, row, body)
        return bool(taken)

    def _run(self, row: Row, body: dict) -> None:
        """Stream one completion from vLLM into the row's handle; it alone ends on any failure."""
        try:
            self._stream(row, body)
        except RequestError as e:
            self._fail(row.handle, e)
        except (OSError, http.client.HTTPException) as e:  # the child died or dropped the connection
            self.revive()
            self._fail(row.handle, RequestError(f"vLLM failed while running the request: {e}",
                                                code="internal_error"))
        except Exception as e:  # noqa: BLE001
            log.exception("streaming from vLLM failed")
            self._fail(row.handle, fault("streaming from vLLM", e))
        finally:
            with self._lock:
                if row in self._rows:
                    self._rows.remove(row)
            self._wake.set()

    def _stream(self, row: Row, body: dict) -> None:
        handle = row.handle
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=600)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise _vllm_error(resp.status, resp.read())
            reason = None
            for raw in resp:
                if handle.cancelled:
                    self.stats["cancelled"] += 1
                    handle._finish(self._completion(row, "cancelled"))
                    return  # closing the connection aborts the request in vLLM
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise _vllm_error(chunk["error"].get("code") or 500, chunk["error"].get("message", ""))
                for choice in chunk.get("choices", ()):
                    self._take(row, choice)
                    reason = choice.get("finish_reason") or reason
            if reason is None:
                raise RequestError("vLLM ended the stream without finishing the request", code="internal_error")
            if reason not in ("stop", "length"):
                why = " (for a task: its prefix could not be loaded; vLLM's log says why)" if \
                    "kv_transfer_params" in body else ""
                raise RequestError(f"vLLM ended the request with finish_reason {reason!r}{why}",
                                   code="internal_error")
            self.stats["completed"] += 1
            handle._finish(self._completion(row, reason))
        finally:
            conn.close()

    def _take(self, row: Row, choice: dict) -> None:
        """One streamed chunk: its tokens, their text and logprobs, pushed to the handle."""
        ids, text = choice.get("token_ids") or [], choice.get("text") or ""
        lps = _logprobs(choice.get("logprobs"), ids, row.handle.request.logprobs)
        for i, tok in enumerate(ids):
            lp = lps[i] if lps else None
            if row.logprobs is not None and lp is not None:
                row.logprobs.append(lp)
            row.ids.append(tok)
            self.stats["generated_tokens"] += 1
            row.handle._push(tok, text if i == len(ids) - 1 else "", lp)  # the chunk's text with its last token
        if text and not ids:  # text with no new token (a flushed stop-string remainder)
            row.handle._push(row.ids[-1] if row.ids else 0, text, None)
        row.text += text


def _vllm_error(status, payload) -> RequestError:
    """vLLM's error answer as the request's error: its 4xx are the client's (400), the rest ours."""
    try:
        msg = json.loads(payload).get("error", {}).get("message") if isinstance(payload, bytes) else str(payload)
    except (ValueError, AttributeError):
        msg = payload.decode("utf-8", "replace")[:500] if isinstance(payload, bytes) else str(payload)
    status = int(status) if str(status).isdigit() else 500
    if 400 <= status < 500:
        return RequestError(f"vLLM refused the request: {msg}")
    return RequestError(f"vLLM failed on the request ({status}): {msg}", code="internal_error")


def _logprobs(lp: dict | None, ids: list[int], top: int | None) -> list[TokenLogprob] | None:
    """vLLM's completion logprobs (tokens named "token_id:N") as ours, one per new token."""
    if not lp or top is None:
        return None
    out = []
    for i, tok in enumerate(ids):
        values, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
        value = values[i] if i < len(values) else None
        alts = tops[i] if i < len(tops) and tops[i] else {}
        pairs = sorted(((int(k.split(":", 1)[1]), v) for k, v in alts.items() if k.startswith("token_id:")),
                       key=lambda kv: -kv[1])[:top]
        out.append(TokenLogprob(tok, value, tuple(pairs)))
    return out


def vllm_options(cfg, model, store_root: Path, store_ref: str | None = None) -> VllmOptions:
    """The child's options from `softprompt serve`'s config, the loaded base and the store (its files'
    directory; for a shared store, the DSN the connector opens)."""
    from softprompt.io.load import embedded_model_dir

    m = cfg.model
    model_dir = Path(m.base) if m.base is not None else embedded_model_dir()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    ctx = getattr(model.config, "max_position_embeddings", None) or 2048
    return VllmOptions(python=find_vllm_python(cfg.vllm_python), model_dir=model_dir, dtype=dtype,
                       store_root=store_root, base_fingerprint=model_fingerprint(model),
                       max_model_len=min(ctx, cfg.vllm_max_model_len), max_num_seqs=cfg.server.max_batch_size,
                       startup_timeout_s=cfg.vllm_startup_timeout_s, store_ref=store_ref)


if __name__ == "__main__":  # pragma: no cover - `python -m softprompt.serve.vllm_backend` prints where vLLM is
    print(find_vllm_python(sys.argv[1] if len(sys.argv) > 1 else None))
