"""Decoder-only LMs: a prompt is a KV prefix before the text (softprompt/hf/prefix.py); every method
compiles to one, so serving mixes tasks in one continuous batch."""

from __future__ import annotations

from softprompt.families.base import Family


class CausalFamily(Family):
    name = "causal_lm"
    description = "decoder-only"
    padding_side = "left"  # a batch's last column is every row's last real token
    peft_task_types = ("CAUSAL_LM",)
    steps = {"geometry": "softprompt.core.geometry:geometry", "methods": "softprompt.methods:METHODS",
             "create": "softprompt.methods:create", "import_peft": "softprompt.families.causal:import_peft",
             # the generic loops are the decoder's own
             "tokenize": "softprompt.loops.data:tokenize", "objective": "softprompt.loops.train:CausalLMObjective",
             "generate": "softprompt.loops.generate:generate",
             "evaluate_groups": "softprompt.loops.evaluate:evaluate_groups"}

    @staticmethod
    def matches(config) -> bool:
        return True  # tried last: whatever is neither an encoder-decoder nor an encoder

    def auto_model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def describe_prefix(self, card: dict) -> str | None:
        geo, P = (card.get("base_model") or {}).get("geometry") or {}, card.get("num_virtual_tokens")
        if not geo:
            return None  # every method compiles to this one KV prefix
        return f"({geo.get('num_layers')}, 2, {geo.get('num_key_value_heads')}, {P}, {geo.get('head_dim')})"


def import_peft(path, cfg: dict, emb, model):
    """A PEFT CAUSAL_LM prompt-tuning, P-tuning or prefix-tuning adapter (config `cfg`, tensor `emb`)
    as one of our decoder prompts; a ValueError says why it does not fit."""
    from softprompt.core.geometry import geometry
    from softprompt.methods import PrefixTuning, PromptTuning, PTuning
    from softprompt.methods.prefix_tuning import peft_to_kv

    geo = geometry(model)
    peft_type = cfg.get("peft_type")
    P = int(cfg.get("num_virtual_tokens") or emb.shape[0])
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise ValueError(f"{path}: adapters for encoder-decoder models are not supported yet")
    config = {"num_virtual_tokens": P, "source": "peft", "peft_type": peft_type}
    if peft_type == "PREFIX_TUNING":
        want = (P, geo.num_layers * 2 * geo.kv_dim)
        if tuple(emb.shape) != want or cfg.get("num_layers") not in (None, geo.num_layers):
            raise ValueError(
                f"{path}: prefix of shape {tuple(emb.shape)} (num_layers={cfg.get('num_layers')}, "
                f"num_attention_heads={cfg.get('num_attention_heads')}) does not fit this model, which needs {want} "
                f"({geo.num_layers} layers x 2 x {geo.num_key_value_heads} KV heads x {geo.head_dim})")
        return PrefixTuning.from_export(geo, config, {"prefix": peft_to_kv(
            emb, geo.num_layers, geo.num_key_value_heads, geo.head_dim)})
    if tuple(emb.shape) != (P, geo.hidden_size):
        raise ValueError(f"{path}: prompt embeddings of shape {tuple(emb.shape)} do not fit this model, "
                         f"which needs ({P}, {geo.hidden_size})")
    cls = PromptTuning if peft_type == "PROMPT_TUNING" else PTuning
    return cls.from_export(geo, config, {"prompt_embeddings": emb})
