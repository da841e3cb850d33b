"""The engine past the float32 limit: tokens/s of the engine on the float32 base, on the int8 base
(`--quantize int8`, softprompt/hf/quantize.py), on the bfloat16 base (`--dtype bfloat16`, where the CPU
has bf16 instructions), and of the bare float32 model (the same engine, no prefix), side by side in
one run, with 64 mixed tasks; plus the engine's float32 tokens/s as a fraction of the matmul limit
measured in the same run (a GFLOP/s probe at the decode's own shapes).

Each ISA is one run of its own, in a child process started with that ISA's environment
(`softprompt.core.device.ISA_CAPS`: the AVX2 cap makes any x86 machine compute as an AVX2-only one):

    python bench/serve_quantized.py                 # native and avx2; 64 tasks, 256 requests, 32 new tokens, batch 32, one thread
    python bench/serve_quantized.py --quick         # 16 tasks, 64 requests, 16 new tokens
    python bench/serve_quantized.py --isa native    # one ISA

`bench/serve_mixed.py` calls `compare()` and adds its `quantized_vs_fp32_base` to its last line.
Writes bench/results/serve_quantized.json (--quick: serve_quantized_quick.json); the last line is
key=value figures, each suffixed with its ISA.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def matmul_gflops(batch: int, hidden: int, inner: int, seconds: float = 1.0) -> float:
    """Best float32 GFLOP/s of (batch, hidden) @ (hidden, inner), the decode step's largest matmul
    shape, on the current threads: the limit the model's own matmuls could reach."""
    x, w = torch.randn(batch, hidden), torch.randn(inner, hidden)
    flops, best, t_end = 2 * batch * hidden * inner, 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(10):
            torch.nn.functional.linear(x, w)
        best = max(best, 10 * flops / (time.perf_counter() - t0) / 1e9)
    return best


def matmul_flops_per_token(model) -> int:
    """2 x the weights every token multiplies (Linear layers, LM head included; attention over the
    cache is left out, which flatters the engine slightly at these lengths)."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2 * n


def has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), as torch runs it here."""
    from softprompt.core.int8_kernels import cpu_features

    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() in ("SSE41", "AVX", "AVX2", "AVX512_CORE")
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_features())) and not capped


def compare(model, tok, requests, tasks, batch: int, rounds: int = 2, bf16: bool | None = None) -> dict:
    """Side by side: engine on the float32 base, on the int8 base (and on the bfloat16 base where
    `bf16`, by default where the CPU has bf16 instructions), and the bare float32 model.
    `requests`, `tasks` as in serve_mixed.py (task artifacts made for `model`). Alternates them for
    `rounds` rounds and keeps each one's best (the least disturbed on a shared machine)."""
    import copy

    from serve_mixed import run_engine

    from softprompt.core.device import resolve
    from softprompt.core.int8_kernels import describe
    from softprompt.hf.quantize import quantize_int8
    from softprompt.io.load import place

    bf16 = has_bf16() if bf16 is None else bf16
    q = quantize_int8(copy.deepcopy(model), tok)  # the same weights, int8; keeps the float32 fingerprint
    runs = [("engine_fp32", model, True), ("engine_int8", q, True), ("bare_fp32", model, False)]
    if bf16:
        runs.append(("engine_bf16", place(copy.deepcopy(model), resolve(device="cpu", dtype="bfloat16")), True))
    geo = model.config
    gflops = matmul_gflops(batch, geo.hidden_size, getattr(geo, "intermediate_size", 4 * geo.hidden_size))
    for _, m, _ in runs[1:]:
        run_engine(m, tok, requests[:8], tasks, batch)  # warm-up (and each base's self-check)
    best = {name: 0.0 for name, _, _ in runs}
    for _ in range(rounds):
        for name, m, prefix in runs:
            tps = run_engine(m, tok, requests, tasks, batch, use_prefix=prefix)[0]
            print(f"{name}: {tps:.1f} tok/s", file=sys.stderr)
            best[name] = max(best[name], tps)
        gflops = max(gflops, matmul_gflops(batch, geo.hidden_size, getattr(geo, "intermediate_size", 4 * geo.hidden_size)))
    limit = gflops * 1e9 / matmul_flops_per_token(model)
    out = {
        "int8_path": describe(),
        "int8_error": round(q.softprompt_int8_error, 4),
        "tokens_per_s_engine_fp32": round(best["engine_fp32"], 1),
        "tokens_per_s_engine_int8": round(best["engine_int8"], 1),
        "tokens_per_s_bare_fp32": round(best["bare_fp32"], 1),
        "quantized_vs_fp32_base": round(best["engine_int8"] / best["bare_fp32"], 2),
        "quantized_vs_fp32_engine": round(best["engine_int8"] / best["engine_fp32"], 2),
        "matmul_gflops_fp32": round(gflops, 1),
        "matmul_limit_tokens_per_s": round(limit, 1),
        "engine_fp32_vs_matmul_limit": round(best["engine_fp32"] / limit, 3),
        "matmul_mflop_per_token": round(matmul_flops_per_token(model) / 1e6, 1),
    }
    if bf16:
        out["tokens_per_s_engine_bf16"] = round(best["engine_bf16"], 1)
        out["bf16_vs_fp32_base"] = round(best["engine_bf16"] / best["bare_fp32"], 2)
    return out


KEYS = ["quantized_vs_fp32_base", "bf16_vs_fp32_base", "quantized_vs_fp32_engine", "engine_fp32_vs_matmul_limit",
        "tokens_per_s_engine_int8", "tokens_per_s_engine_bf16", "tokens_per_s_engine_fp32", "tokens_per_s_bare_fp32"]


def child(args) -> None:
    """One ISA's run (this process was started with its environment): prints its result as JSON."""
    from serve_mixed import make_prompts, make_tasks

    from softprompt.core.device import set_threads
    from softprompt.io.load import load_base

    set_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tok = load_base(device="cpu")
    import tempfile

    tasks = make_tasks(model, tok, args.tasks, Path(tempfile.mkdtemp(prefix="serve_quantized_")))
    names = list(tasks)
    requests = [(rng.choice(names), ids, args.new_tokens) for ids in make_prompts(tok, args.requests, rng)]
    print(f"[{args.child}] {args.tasks} tasks, {args.requests} requests, {args.new_tokens} new tokens, batch "
          f"{args.batch}, {torch.get_num_threads()} thread(s), ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    result = compare(model, tok, requests, tasks, args.batch, args.rounds)
    print(json.dumps({**result, "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)}))


def main():
    from record import Record, Sections, add_fail_section, isa_list, run_under_isa

    from softprompt.core.device import ISA_CAPS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the goal is stated for one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--isa", default="native,avx2", help=f"the ISAs to run, each in a child process ({', '.join(ISA_CAPS)})")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    add_fail_section(ap)
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.requests, args.new_tokens, args.rounds = 16, 64, 16, 2
    if args.child:
        return child(args)
    isas = isa_list(ap, args.isa)
    full = (args.tasks, args.requests, args.new_tokens, args.batch) == (64, 256, 32, 32) and isas == ["native", "avx2"]
    rec = Record("serve_quantized", quick=args.quick, full=full)
    sections = Sections(fail=args.fail_section)
    argv = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
            ("tasks", "requests", "new-tokens", "batch", "rounds", "threads", "seed")]
    result = {"tasks": args.tasks, "requests": args.requests, "new_tokens": args.new_tokens, "batch": args.batch,
              "quick": args.quick, "rounds": args.rounds, "isa": {}}
    for isa in isas:
        got = sections(isa, run_under_isa, __file__, isa, argv)
        if got is not None:
            result["isa"][isa] = got
            result.update({f"{k}_{isa}": got[k] for k in KEYS if k in got})
    sys.exit(rec.finish(result, [f"{k}_{isa}" for isa in isas for k in KEYS], sections, threads=args.threads))


if __name__ == "__main__":
    main()
