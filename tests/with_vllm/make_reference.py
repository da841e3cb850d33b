"""Reference outputs of our engine for the vLLM exactness test (run in the main venv, where our
training and serving code runs; vLLM's venv has another transformers).

    .venv/bin/python tests/with_vllm/make_reference.py OUT_DIR

Writes OUT_DIR/store (a store with three tasks, one per method, compiled for the embedded
SmolLM2-135M in float32) and OUT_DIR/reference.json: per request its task, prompt ids, and our
engine's greedy tokens with each token's logprob, plus the bare model's tokens for the same prompt.
Prefix lengths 7, 20 and 45 straddle the test's 32-token vLLM blocks (a partial block, a block and
a half, a whole block plus a partial one).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import softprompt as sp
from softprompt import methods
from softprompt.core.geometry import model_fingerprint
from softprompt.io.artifact import save_artifact
from softprompt.io.load import embedded_model_dir
from softprompt.serve import Engine, Request
from softprompt.store.core import Store

TASKS = [("prefix", "prefix_tuning", 7, dict(projection_dim=0)), ("prompt", "prompt_tuning", 20, {}),
         ("ptune", "p_tuning", 45, {})]
PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "1, 2, 3, 4,",
           "Translate to German: good morning"]
NEW_TOKENS = 8


def make_tasks(model, out: Path) -> Store:
    store = Store(out / "store")
    for i, (name, method, P, opts) in enumerate(TASKS):
        prompt = methods.create(method, model, num_virtual_tokens=P, seed=i, **opts)
        with torch.no_grad():  # far from any init, so the prefix visibly changes the output
            g = torch.Generator().manual_seed(100 + i)
            for p in prompt.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5 * (p.detach().float().std() + 0.1))
        path = save_artifact(prompt, out / f"{name}.safetensors", model)
        store.add(name, path, model)  # compiled for this base in float32 at publish time
    return store


def run(engine, task, ids):
    req = Request(prompt_ids=ids, task=task, max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    out = engine.generate([req])[0]
    assert out.error is None, out.error
    return out.token_ids, [lp.logprob for lp in out.logprobs]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model, tok = sp.load_base(dtype="float32")
    store = make_tasks(model, out)
    engine = Engine(model, tok, {name: store.open(name, model) for name, *_ in TASKS})
    rows, lengths = [], {name: P for name, _, P, _ in TASKS}
    for j, text in enumerate(PROMPTS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        bare = run(engine, None, ids)
        for name, *_ in TASKS:
            toks, lps = run(engine, name, ids)
            entry = store.entry(name)
            rows.append(dict(task=name, sha256=entry.sha256, P=lengths[name], prompt_ids=ids, tokens=toks,
                             logprobs=lps, bare_tokens=bare[0], bare_logprobs=bare[1]))
    ref = dict(model_dir=str(embedded_model_dir()), store=str(out / "store"), base_fingerprint=model_fingerprint(model),
               vocab_size=model.config.vocab_size, new_tokens=NEW_TOKENS, rows=rows)
    (out / "reference.json").write_text(json.dumps(ref, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(Path(sys.argv[1]))
