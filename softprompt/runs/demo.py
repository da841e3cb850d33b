"""`softprompt demo`: the main job. Train a prompt on a small task the project ships, on the
embedded model, in about two minutes on 2 CPU cores; show outputs before and after; save it.

The task (made here from templates, written to softprompt/assets/weather_*.jsonl by
`python -m softprompt.runs.demo`): a weather record in, a one-line report in a fixed house style out.

    {"input": "city: Oslo | sky: rain | high: 12 | wind: strong",
     "output": "Oslo: rain, high of 12 degrees, strong wind."}

The bare model does not know the house style; a prefix learns it in a few dozen steps.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

DATA_DIR = Path(__file__).parents[1] / "assets"
CITIES = ["Oslo", "Lima", "Cairo", "Perth", "Quito", "Dublin", "Hanoi", "Tunis", "Riga", "Porto", "Accra", "Sofia",
          "Kyoto", "Basel", "Austin", "Denver", "Leeds", "Malmo", "Turin", "Graz"]
SKIES = ["sunny", "cloudy", "rain", "snow", "fog", "showers", "storms", "clear skies"]
WINDS = ["calm", "light", "strong", "gusty"]


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        city, sky, wind = rng.choice(CITIES), rng.choice(SKIES), rng.choice(WINDS)
        high = rng.randint(-5, 35)
        rows.append({"input": f"city: {city} | sky: {sky} | high: {high} | wind: {wind}",
                     "output": f"{city}: {sky}, high of {high} degrees, {wind} wind."})
    return rows


def write_data(directory: Path = DATA_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("weather_train.jsonl", 400, 1), ("weather_dev.jsonl", 40, 2)):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, seed)))


def run_demo(out: str = "out/demo", steps: int = 30, base: str | None = None, method: str = "prefix_tuning",
             seed: int = 0) -> dict:
    import torch

    from softprompt.io.load import load_base
    from softprompt.loops.data import DataConfig, read_examples
    from softprompt.loops.evaluate import predict, score
    from softprompt.runs.config import RunConfig
    from softprompt.runs.train import run_train

    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_path, dev_path = DATA_DIR / "weather_train.jsonl", DATA_DIR / "weather_dev.jsonl"
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if base is None:
        say("loading the embedded SmolLM2-135M-Instruct ...")
    model, tok = load_base(base)
    dev = read_examples(dev_path, DataConfig())
    show = dev[:3]
    prompts = [ex.prompt for ex in dev[:16]]
    refs = [[ex.target] for ex in dev[:16]]

    def outputs(kv):
        return predict(model, tok, prompts, kv, max_new_tokens=24, batch_size=16)

    say("\n== before training (bare model) ==")
    before = outputs(None)
    for ex, o in zip(show, before):
        say(f"  {ex.prompt}\n    -> {o}")
    s_before = score(before, refs)
    out_dir = Path(out)
    if out_dir.exists() and (out_dir / "metrics.jsonl").exists():
        import shutil

        shutil.rmtree(out_dir)  # the demo always starts fresh
    say(f"\n== training {method} for {steps} steps (batch {RunConfig().train.batch_size}) ==")
    t0 = time.perf_counter()
    cfg = RunConfig.of(train_data=str(train_path), out=str(out), overwrite=True, method=method,
                       eval_data=str(dev_path), steps=steps, warmup_steps=max(1, steps // 10),
                       eval_every=max(1, steps // 2), checkpoint_every=0, seed=seed)
    run_train(cfg, model, tok)
    minutes = (time.perf_counter() - t0) / 60
    from softprompt.io.artifact import load_artifact

    kv = load_artifact(out_dir / "best", model).to_kv_prefix(model)
    after = outputs(kv)
    s_after = score(after, refs)
    say("\n== after training ==")
    for ex, o in zip(show, after):
        say(f"  {ex.prompt}\n    -> {o}\n    (reference: {ex.target})")
    say(f"\nexact match on 16 held-out records: {s_before['exact_match']:.0f}% before, {s_after['exact_match']:.0f}% "
        f"after; BLEU {s_before['bleu']:.1f} -> {s_after['bleu']:.1f}; trained in {minutes:.1f} min")
    say(f"artifact: {out_dir / 'best'}   plot: {out_dir / 'plot.png'}\n"
        f"try it:   softprompt generate \"city: Oslo | sky: snow | high: -3 | wind: calm\" --adapter {out_dir / 'best'}")
    return {"before": s_before, "after": s_after, "minutes": minutes}


if __name__ == "__main__":
    write_data()
    print(f"wrote {DATA_DIR}/weather_train.jsonl and weather_dev.jsonl")
