"""softprompt: prompt tuning, prefix tuning and P-tuning on a frozen language model.

The public API, in PEFT's idiom (softprompt/runs/api.py):

    import softprompt as sp
    model, tok = sp.load_base()                                  # the embedded model, or a path
    prompt = sp.create(model, sp.PrefixTuningConfig(num_virtual_tokens=20), tok)
    sp.train(prompt, model, tok, rows, steps=200)                # dicts, a file, or a datasets.Dataset
    print(sp.generate(model, tok, ["name[Aromi] ||"], prompt))
    prompt.save_pretrained("out/e2e")
    prompt = sp.load("out/e2e", model)

As one model, in PEFT's idiom (softprompt/runs/model.py): `generate` and `forward` honour the prompt.

    pm = sp.get_model(model, prompt, tok)                        # or a config, as get_peft_model takes
    pm.print_trainable_parameters()
    ids = pm.generate(**tok(["name[Aromi] ||"], return_tensors="pt"), max_new_tokens=20)
    pm.save_pretrained("out/e2e-pm")
    pm = sp.PromptModel.from_pretrained(model, "out/e2e-pm", tok)   # or a Hub repo id; push_to_hub too
    sp.export_peft(pm.prompt, "out/e2e-peft", model)             # a PEFT adapter directory

Names load on first use, so `import softprompt` (and `softprompt --help`) stays light.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_base": "softprompt.io.load",
    "create": "softprompt.runs.api",
    "train": "softprompt.runs.api",
    "generate": "softprompt.runs.api",
    "load": "softprompt.runs.api",
    "compile_text": "softprompt.runs.distill",
    "distill": "softprompt.runs.distill",
    "DistillConfig": "softprompt.runs.distill_config",
    "get_model": "softprompt.runs.model",
    "PromptModel": "softprompt.runs.model",
    "export_peft": "softprompt.io.peft",
    "PrefixTuningConfig": "softprompt.methods",
    "PromptTuningConfig": "softprompt.methods",
    "PTuningConfig": "softprompt.methods",
    "TrainConfig": "softprompt.loops.train",
    "SamplingParams": "softprompt.loops.generate",
    "Engine": "softprompt.serve",
    "Request": "softprompt.serve",
    "Store": "softprompt.store.core",
    "offtask_summary": "softprompt.runs.api",
    "audit": "softprompt.auditing",
    "AuditConfig": "softprompt.auditing",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_EXPORTS[name])
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)

