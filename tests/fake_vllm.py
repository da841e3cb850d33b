"""A stand-in for `vllm serve`, for the tests of `softprompt serve --backend vllm` without vLLM: it
takes vLLM's arguments, answers /health, and streams /v1/completions as vLLM does (SSE chunks with
`token_ids`, `finish_reason`, logprobs named "token_id:N"). Each request body is appended to
$FAKE_VLLM_LOG (JSONL) so a test can read what the engine sent.

Its output is a fixed function of the prompt: new token i is (sum of the prompt ids + i) % 50 + 3,
with text " w<id>". A request with seed 400 is refused (400); seed 500 makes the process exit after
its first token (a crash); seed 300 waits 0.2 s per token."""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def tokens(prompt: list[int], n: int) -> list[int]:
    return [(sum(prompt) + i) % 50 + 3 for i in range(n)]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
            f.write(json.dumps(body) + "\n")
        if body.get("seed") == 400:
            return self._json(400, {"error": {"message": "fake vLLM refuses seed 400", "type": "BadRequestError",
                                              "code": 400}})
        ids = tokens(body["prompt"], body.get("max_tokens", 16))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i, t in enumerate(ids):
            last = i == len(ids) - 1
            choice = {"index": 0, "text": f" w{t}", "token_ids": [t], "finish_reason": "length" if last else None}
            if body.get("logprobs") is not None:
                top = {f"token_id:{t}": -0.25, "token_id:1": -2.0, "token_id:2": -3.0}
                choice["logprobs"] = {"tokens": [f"token_id:{t}"], "token_logprobs": [-0.25], "top_logprobs": [top]}
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
            if body.get("seed") == 500:
                os._exit(3)
            if body.get("seed") == 300:  # slow: a client can go away mid-stream
                time.sleep(0.2)
        self.wfile.write(b"data: [DONE]\n\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--kv-transfer-config", required=True)
    args, _ = p.parse_known_args()
    json.loads(args.kv_transfer_config)
    print("fake vLLM serving", sys.argv[1:], flush=True)
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
