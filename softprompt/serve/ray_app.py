"""`softprompt serve --ray`: today's server, N times, on Ray Serve, over one shared prompt store.

    client -> Ingress (HTTP, Ray Serve's proxy) --handle, multiplexed_model_id=task--> TaskServer x N
                                                                                    (engine + the app)

Each TaskServer replica runs exactly what `softprompt serve` runs (`build_app`: the frozen model,
the continuous-batching engine, the FastAPI app of serve/http.py) and answers requests by calling
that app in-process over ASGI, so routes, errors and streaming are the plain server's own. The
Ingress forwards each request unchanged and only reads the body's `"model"`: it becomes Ray Serve's
multiplexed model id, so a task's requests go to replicas that already hold its prefix (Ray loads
it on another replica, through `hold`, when none does or they are busy). Replicas resolve tasks in
the store on every request, so a new task or version serves everywhere without a restart.

Faults: a replica that dies mid-request surfaces at the Ingress as a Ray actor error. A greedy
request (temperature 0: the same answer anywhere) is sent again, to another replica, up to
`retries` times; any other request gets a 503 with `Retry-After` and code `replica_unavailable`,
as does a stream cut after its first bytes (as a final SSE error event). Every wait is bounded
(`timeout_s`), so no request hangs on a dead replica. Ray's controller restarts the replica.

Python entry for an existing cluster: `serve.run(build(store="postgresql://...", replicas=4))`,
or `serve run softprompt.serve.ray_app:app_builder store=postgresql://... replicas=4` (docs/distributed.md).
"""


import asyncio
import json
import sys

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

MAX_TASKS_PER_REPLICA = 4096  # routing affinity only: the engine's prefix cache bounds the memory
HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


async def call_asgi(app, method: str, path: str, query: bytes, headers: list, body: bytes):
    """Run one request through an ASGI app in this process: yields {"status", "headers"} and then the
    body's chunks as the app sends them (a stream stays a stream). Closing the generator tells the
    app that the client went away (its rows are cancelled, as under uvicorn)."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run():
        try:
            await app(scope, receive, out.put)
        finally:
            await out.put(None)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    task = asyncio.create_task(run())
    try:
        while (msg := await out.get()) is not None:
            if msg["type"] == "http.response.start":
                yield {"status": msg["status"], "headers": [(k.decode("latin-1"), v.decode("latin-1"))
                                                            for k, v in msg.get("headers", [])]}
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield bytes(msg["body"])
                if not msg.get("more_body"):
                    break
    finally:
        gone.set()
        try:
            await asyncio.wait_for(task, 5)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the app's error was already sent as a 500
            task.cancel()


@serve.deployment(max_ongoing_requests=512, health_check_period_s=2, health_check_timeout_s=10)
class TaskServer:
    """One replica: `build_app` (serve/main.py) over `ServeConfig.of(store=store, base=base, **options)`,
    with its engine running."""

    def __init__(self, store: str | None, base: str | None, threads: int = 1, options: dict | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)  # replicas share a node's cores: one thread each unless told
        from softprompt.serve.config import ServeConfig
        from softprompt.serve.main import build_app

        self.app, self.config = build_app(ServeConfig.of(store=store, base=base, **(options or {})))
        self.engine = self.app.state.engine
        self.engine.start()  # what the app's lifespan does under uvicorn
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    @serve.multiplexed(max_num_models_per_replica=MAX_TASKS_PER_REPLICA)
    async def hold(self, task: str):
        """Ray's "load model": start loading the task's prefix beside the engine's loop, so the request
        that follows finds it. An unknown or refused task is left to that request (404 / 400)."""
        try:
            fut = self.engine._load_task(task, background=True)  # the engine's own loader (serve/loader.py)
            await asyncio.wrap_future(fut)
        except Exception:  # noqa: BLE001 - reported by the request itself, with its status
            pass
        return task

    async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        task = serve.get_multiplexed_model_id()
        if task:
            await self.hold(task)
        async for item in call_asgi(self.app, method, path, query, headers, body):
            if isinstance(item, dict):  # which replica answered: for logs, and the routing test
                item["headers"].append(("x-softprompt-replica", self.replica_id))
            yield item

    def check_health(self):
        if not self.engine.running:
            raise RuntimeError("the engine's loop is not running")


# (defined before the ingress: Ray pickles its FastAPI app, with what its routes reach, at decoration)
async def _bounded(gen, timeout_s: float):
    """The generator's items, each awaited at most `timeout_s` (no wait on a dead replica is unbounded)."""
    while True:
        try:
            yield await asyncio.wait_for(gen.__anext__(), timeout_s)
        except StopAsyncIteration:
            return


def _without_length(headers: list) -> dict:
    return {k: v for k, v in headers if k.lower() not in HOP_HEADERS}


ingress_app = FastAPI(title="softprompt on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


def route_of(body: bytes) -> tuple[str, bool]:
    """(task to route by, or "" for any replica; whether the request is greedy, hence safe to resend)."""
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        return "", False
    if not isinstance(doc, dict):
        return "", False
    model = doc.get("model")
    return (model if isinstance(model, str) else ""), doc.get("temperature") == 0


def unavailable(message: str, status: int = 503) -> JSONResponse:
    from softprompt.serve.guard import error_body

    return JSONResponse(error_body(message, "service_unavailable", "replica_unavailable"), status,
                        headers={"Retry-After": "1"})


@serve.deployment(max_ongoing_requests=2048)
@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, servers, retries: int = 2, timeout_s: float = 150.0):
        self.servers, self.retries, self.timeout_s = servers, retries, timeout_s

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def forward(self, path: str, request: Request):
        from ray.exceptions import RayActorError

        body = await request.body()
        task, greedy = route_of(body) if request.method == "POST" else ("", True)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        handle = self.servers.options(stream=True, multiplexed_model_id=task)
        attempts = 1 + (self.retries if greedy else 0)
        for attempt in range(attempts):
            gen = handle.handle.remote(request.method, "/" + path, request.url.query.encode(), headers, body)
            try:
                head = await asyncio.wait_for(gen.__anext__(), self.timeout_s)
                head["headers"].append(("x-softprompt-attempts", str(attempt + 1)))  # >1: resent after a loss
                if dict(head["headers"]).get("content-type", "").startswith("text/event-stream"):
                    return StreamingResponse(self._rest(gen), status_code=head["status"],
                                             headers=_without_length(head["headers"]))
                chunks = [c async for c in _bounded(gen, self.timeout_s)]
            except (RayActorError, asyncio.TimeoutError, StopAsyncIteration) as e:
                gen.cancel()
                if attempt + 1 < attempts and not isinstance(e, asyncio.TimeoutError):
                    continue  # greedy: the same answer from another replica
                what = "timed out" if isinstance(e, asyncio.TimeoutError) else "was lost (it is being restarted)"
                return unavailable(f"the replica serving this request {what}; retry the request")
            return Response(b"".join(chunks), status_code=head["status"], headers=_without_length(head["headers"]))

    async def _rest(self, gen):
        from ray.exceptions import RayActorError

        from softprompt.serve.guard import error_body

        try:
            async for chunk in _bounded(gen, self.timeout_s):
                yield chunk
        except (RayActorError, asyncio.TimeoutError):
            err = error_body("the replica serving this stream was lost; retry the request", "service_unavailable",
                             "replica_unavailable")
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            gen.cancel()


def build(store: str | None = None, base: str | None = None, replicas: int = 1, threads: int = 1,
          replica_cpus: float = 1.0, retries: int = 2, timeout_s: float = 150.0, **options):
    """The Ray Serve application: an Ingress over `replicas` TaskServers; `options` go to build_app."""
    servers = TaskServer.options(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus}) \
        .bind(store, base, threads, options)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(servers, retries, timeout_s)


def app_builder(args: dict):
    """For `serve run softprompt.serve.ray_app:app_builder store=... replicas=N` (strings from the CLI)."""
    kinds = {"replicas": int, "threads": int, "replica_cpus": float, "retries": int, "timeout_s": float,
             "max_batch_size": int, "max_queue": int, "prefix_cache_mb": int, "request_timeout_s": float}
    return build(**{k: kinds.get(k, str)(v) for k, v in args.items()})


def run(store: str | None, host: str, port: int, base: str | None, replicas: int, address: str | None = None,
        threads: int = 1, **options) -> None:
    """Start (or join, with `address`) a Ray cluster, deploy, and serve until interrupted."""
    import ray

    ray.init(address=address, include_dashboard=False, log_to_driver=False) if address else \
        ray.init(num_cpus=max(2, replicas + 1), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(store, base, replicas=replicas, threads=threads, **options), name="softprompt", route_prefix="/")
    print(f"softprompt on Ray Serve: {replicas} replica(s) on http://{host}:{port}; OpenAI base_url "
          f"http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr)
    try:
        while True:
            import time

            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
