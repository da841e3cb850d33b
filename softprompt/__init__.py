"""softprompt: prompt tuning, prefix tuning and P-tuning on a frozen language model.

The public API, in PEFT's idiom (softprompt/api.py):

    import softprompt as sp
    model, tok = sp.load_base()                                  # the embedded model, or a path
    prompt = sp.create(model, sp.PrefixTuningConfig(num_virtual_tokens=20), tok)
    sp.train(prompt, model, tok, rows, steps=200)                # dicts, a file, or a datasets.Dataset
    print(sp.generate(model, tok, ["name[Aromi] ||"], prompt))
    prompt.save_pretrained("out/e2e")
    prompt = sp.load("out/e2e", model)

Names load on first use, so `import softprompt` (and `softprompt --help`) stays light.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_base": "softprompt.models",
    "create": "softprompt.api",
    "train": "softprompt.train",  # a callable module: see _CallableModule
    "generate": "softprompt.generate",
    "load": "softprompt.api",
    "PrefixTuningConfig": "softprompt.methods",
    "PromptTuningConfig": "softprompt.methods",
    "PTuningConfig": "softprompt.methods",
    "TrainConfig": "softprompt.train",
    "SamplingParams": "softprompt.generate",
    "Engine": "softprompt.serve",
    "Request": "softprompt.serve",
    "Store": "softprompt.store",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__ == f"softprompt.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)


class _CallableModule(__import__("types").ModuleType):
    """`sp.train(...)` and `sp.generate(...)` are the API's functions (softprompt/api.py), and
    `softprompt.train` / `softprompt.generate` are also the modules of the training loop and the
    decoding loop. Each of those two modules is made callable (it calls the API function of its
    name), so both readings hold: `from softprompt.train import Trainer` and `sp.train(prompt, ...)`."""

    def __call__(self, *args, **kwargs):
        from . import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)
