"""PEFT's idiom: a frozen base and a prompt as one model (`sp.get_model`, like `peft.get_peft_model`).

    model, tok = sp.load_base()
    pm = sp.get_model(model, sp.PrefixTuningConfig(task_type="CAUSAL_LM"), tok)
    pm.print_trainable_parameters()
    out = pm.generate(**tok(["name[Aromi] ||"], return_tensors="pt"), max_new_tokens=20)
    pm.save_pretrained("runs/x")                       # our artifact (peft_format=True: PEFT's)
    pm = sp.PromptModel.from_pretrained(model, "runs/x")  # or a Hub repo id, or a PEFT adapter

`generate` takes transformers' arguments and returns transformers' tensor (the inputs, then the new
tokens, padded with `pad_token_id` after a row's end), through the same decoding loop as
`sp.generate` and the server (softprompt/loops/generate.py): one KV prefix per call, compiled from the
prompt as it is then (training between calls is seen). `forward` is the prompt's own forward
(differentiable), so a hand-written training loop over `pm(input_ids, attention_mask, labels=...)`
trains the prompt. Only decoder-only bases (PEFT's CAUSAL_LM) are wrapped; `sp.generate` covers the
others.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from softprompt.families import family_of
from softprompt.io.artifact import save_artifact
from softprompt.methods import PromptMethod
from softprompt.methods.config import CONFIGS

# transformers' generate() arguments honoured here; any other is refused, naming it (never ignored)
GENERATE_ARGS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                 "pad_token_id", "num_return_sequences", "num_beams", "use_cache", "return_dict_in_generate",
                 "repetition_penalty", "min_new_tokens")
WRAPPED_TASK_TYPE = "CAUSAL_LM"


def get_model(model, prompt, tokenizer=None) -> "PromptModel":
    """`model` with `prompt` as one model (PEFT's `get_peft_model`): `prompt` is a prompt (made by
    `sp.create`, `sp.load`, or trained) or a method config, from which a new prompt is created
    (`sp.create(model, config, tokenizer)`: with a tokenizer it starts from text)."""
    if isinstance(prompt, tuple(CONFIGS.values())):
        from softprompt.runs.api import create

        prompt = create(model, prompt, tokenizer)
    return PromptModel(model, prompt, tokenizer)


class PromptModel(nn.Module):
    """A frozen base model and a prompt, as one module: `generate` and `forward` run the base under
    the prompt; `save_pretrained`, `from_pretrained`, `push_to_hub`, `print_trainable_parameters` as
    in PEFT. Attributes it does not have (`config`, `device`, `generation_config`, ...) are the base's."""

    def __init__(self, model, prompt: PromptMethod, tokenizer=None):
        super().__init__()
        if not isinstance(prompt, PromptMethod):
            raise TypeError(f"expected a prompt (sp.create, sp.load) or a method config, got {type(prompt).__name__}")
        family = family_of(model)
        if WRAPPED_TASK_TYPE not in family.peft_task_types:
            raise ValueError(f"PromptModel wraps decoder-only models; this base is {family.description}: "
                             "use sp.generate(model, tokenizer, texts, prompt)")
        self.base_model = model
        self.prompt = prompt
        self.__dict__["tokenizer"] = tokenizer  # not a module
        if prompt.__dict__.get("_save") is None or prompt.__dict__.get("_base_ref") is None:
            prompt.attach_base(model, save_artifact)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            if name in ("base_model", "prompt"):  # not set yet: no recursion
                raise
            return getattr(self.base_model, name)

    def train(self, mode: bool = True) -> "PromptModel":
        """Training mode for the prompt (its dropout, if any); the base stays in eval mode, frozen."""
        super().train(mode)
        self.base_model.eval()
        return self

    @property
    def task_type(self) -> str:
        return WRAPPED_TASK_TYPE

    # --- running ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None, **kwargs):
        """The base under the prompt over a left-padded batch (B, T): transformers' `CausalLMOutput`
        with `logits` (B, T, V) aligned with `input_ids` (the virtual tokens have none) and, given
        `labels` (B, T; -100 ignored), the mean next-token cross-entropy as `loss` (transformers'
        shift). Differentiable in the prompt's parameters."""
        from transformers.modeling_outputs import CausalLMOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        refused = sorted(k for k in kwargs if k not in ("output_attentions", "output_hidden_states", "return_dict"))
        if refused:
            raise ValueError(f"PromptModel.forward does not take {', '.join(refused)}: the prompt is its only "
                             "cache; it takes input_ids, attention_mask and labels")
        kwargs.pop("return_dict", None)
        out = self.prompt(self.base_model, input_ids, attention_mask, **kwargs)
        logits = out.logits
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = nn.functional.cross_entropy(shift, labels[:, 1:].reshape(-1).to(shift.device), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits, attentions=getattr(out, "attentions", None),
                              hidden_states=getattr(out, "hidden_states", None))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config=None, **kwargs) -> torch.Tensor:
        """transformers' `generate` under the prompt: greedy unless `do_sample=True` (then
        `temperature`, `top_k`, `top_p`, drawn from torch's global generator as transformers does).
        `repetition_penalty` (over the row's prompt and new tokens, as transformers' processor) and
        `min_new_tokens` (no EOS before) too. `max_new_tokens` (or `max_length`), `eos_token_id`,
        `pad_token_id` and the rest default to `generation_config`, else the base's; its other fields
        are not applied, and given as arguments they are refused. The batch must be left-padded.
        Returns (B * num_return_sequences, T + new) token ids, like transformers."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("PromptModel.generate needs input_ids (a left-padded batch of token ids)")
        unknown = sorted(k for k in kwargs if k not in GENERATE_ARGS)
        if unknown:
            raise ValueError(f"PromptModel.generate does not support {', '.join(unknown)}; it honours "
                             f"{', '.join(GENERATE_ARGS)}")
        gc = generation_config if generation_config is not None else getattr(self.base_model, "generation_config", None)

        def arg(name, default=None):
            value = kwargs.get(name)
            return value if value is not None else getattr(gc, name, None) if getattr(gc, name, None) is not None \
                else default

        if int(arg("num_beams", 1)) != 1:
            raise ValueError("PromptModel.generate decodes greedily or by sampling; for beam search use "
                             "softprompt.loops.evaluate.beam_search or `softprompt eval --num-beams`")
        if kwargs.get("return_dict_in_generate"):
            raise ValueError("PromptModel.generate returns the token ids only (return_dict_in_generate=False)")
        dev = next(self.base_model.parameters()).device
        input_ids = input_ids.to(dev)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("the batch is right-padded; pad on the left (tokenizer.padding_side = 'left'), as "
                             "transformers asks of decoder-only models")
        n = int(arg("num_return_sequences", 1))
        if n > 1:
            input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
        T = input_ids.shape[1]
        max_new = kwargs.get("max_new_tokens")
        if max_new is None and kwargs.get("max_length") is not None:
            max_new = int(kwargs["max_length"]) - T
        if max_new is None:
            max_new = arg("max_new_tokens")
        if max_new is None:
            max_new = int(arg("max_length", 20)) - T
        params = self._sampling(int(max(max_new, 0)), arg)
        eos = self._eos(kwargs.get("eos_token_id"), gc)
        pad = arg("pad_token_id")
        if pad is None:
            pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = min(eos) if eos else 0
        from softprompt.loops.generate import generate_ids

        rows = generate_ids(self.base_model, input_ids, attention_mask, [self.prompt.to_kv_prefix(self.base_model)],
                            params, eos)
        width = max((len(r) for r in rows), default=0)
        new = torch.full((len(rows), width), int(pad), dtype=input_ids.dtype, device=dev)
        for i, r in enumerate(rows):
            new[i, :len(r)] = torch.tensor(r, dtype=input_ids.dtype, device=dev)
        return torch.cat([input_ids, new], dim=1)

    @staticmethod
    def _sampling(max_new_tokens: int, arg):
        from softprompt.loops.generate import SamplingParams

        shared = dict(max_new_tokens=max_new_tokens, repetition_penalty=float(arg("repetition_penalty", 1.0)),
                      min_tokens=min(int(arg("min_new_tokens", 0)), max_new_tokens))
        if not arg("do_sample", False):
            return SamplingParams(**shared)
        temperature = float(arg("temperature", 1.0))
        if temperature <= 0:
            raise ValueError(f"do_sample=True needs a temperature > 0, got {temperature} (do_sample=False is greedy)")
        return SamplingParams(**shared, temperature=temperature, top_k=int(arg("top_k", 50)),
                              top_p=float(arg("top_p", 1.0)))

    def _eos(self, given, gc) -> set[int]:
        """The ids that end a row: `eos_token_id` as given, else the generation config's and the
        tokenizer's (what `sp.generate` stops at)."""
        from softprompt.loops.generate import eos_ids

        source = given if given is not None else getattr(gc, "eos_token_id", None)
        ids = set() if given is not None else eos_ids(self.tokenizer)
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
        return ids

    # --- sizes --------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters): the prompt's and the base's, as PEFT counts them."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """PEFT's line: `trainable params: N || all params: M || trainable%: X`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
              f"{100 * trainable / total:.4f}")

    # --- storage ------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, *, peft_format: bool = False, **card) -> Path:
        """Write the prompt to `path`: our artifact (a directory, or one `*.safetensors` file; `card`:
        metrics=, dataset=, ...), or with `peft_format=True` a PEFT adapter directory that
        `PeftModel.from_pretrained` loads (`sp.export_peft`). Both load back with `from_pretrained`."""
        if peft_format:
            from softprompt.io.peft import export_peft

            if card:
                raise ValueError(f"a PEFT adapter carries no card: drop {', '.join(sorted(card))}")
            return export_peft(self.prompt, path, self.base_model)
        return Path(self.prompt.save_pretrained(path, self.base_model, **card))

    @classmethod
    def from_pretrained(cls, model, path: str | os.PathLike, tokenizer=None, *, is_trainable: bool = False,
                        allow_other_base: bool = False, revision: str | None = None,
                        token: str | None = None) -> "PromptModel":
        """`model` under the prompt saved at `path`: our artifact or a PEFT adapter directory, checked
        against `model`'s weights; or a Hub repo id (downloaded with huggingface_hub, the `[hf]` extra;
        with HF_HUB_OFFLINE=1, only from its cache). As in PEFT, the prompt is frozen unless
        `is_trainable=True`."""
        from softprompt.runs.api import load

        local = Path(path)
        if not local.exists() and _looks_like_repo_id(str(path)):
            local = _download(str(path), revision, token)
        prompt = load(local, model, allow_other_base=allow_other_base)
        prompt.requires_grad_(is_trainable)
        return cls(model, prompt, tokenizer)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload prompt with softprompt", revision: str | None = None,
                    peft_format: bool = False):
        """Save the prompt (as `save_pretrained` does, with a README naming the base) and upload it to the
        Hub model repo `repo_id`, created if missing (huggingface_hub's `HfApi`, the `[hf]` extra).
        Returns huggingface_hub's CommitInfo."""
        from softprompt.core.extras import require

        hub = require("huggingface_hub", "hf", "push_to_hub")
        api = hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="softprompt-push-") as tmp:
            folder = Path(tmp) / "prompt"
            self.save_pretrained(folder, peft_format=peft_format)
            (folder / "README.md").write_text(self._readme(repo_id, peft_format), encoding="utf-8")
            return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                     revision=revision, repo_type="model")

    def _readme(self, repo_id: str, peft_format: bool) -> str:
        base = getattr(self.base_model, "name_or_path", "") or ""
        if peft_format:
            use = (f"from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"{repo_id}\")")
        else:
            use = (f"import softprompt as sp\nmodel, tok = sp.load_base({base!r})\n"
                   f"pm = sp.PromptModel.from_pretrained(model, \"{repo_id}\", tok)")
        return (f"---\nlibrary_name: {'peft' if peft_format else 'softprompt'}\ntags: [softprompt, "
                f"{self.prompt.method.replace('_', '-')}]\n---\n\n# {repo_id}\n\nA {self.prompt.method.replace('_', ' ')} "
                f"prompt ({self.prompt.num_virtual_tokens} virtual tokens) for the frozen base `{base}`, "
                f"made with softprompt.\n\n```python\n{use}\n```\n")

    def __repr__(self) -> str:
        return (f"PromptModel(base={type(self.base_model).__name__}, method={self.prompt.method}, "
                f"num_virtual_tokens={self.prompt.num_virtual_tokens})")


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def _download(repo_id: str, revision: str | None, token: str | None) -> Path:
    from softprompt.core.extras import MissingExtra, hint, require
    from softprompt.io.artifact import ArtifactError

    try:
        hub = require("huggingface_hub", "hf")
    except MissingExtra as e:
        raise ArtifactError(f"no artifact at {repo_id}: the path does not exist (as a Hub repo id it needs "
                            f"huggingface_hub: {hint('hf')})") from e
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, token=token))
    except Exception as e:  # offline and not cached, no such repo, no access: one line
        raise ArtifactError(f"no artifact at {repo_id}: not a local path, and the Hub gave "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
