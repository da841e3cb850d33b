"""The one boundary with transformers' internals.

Only this package builds, reads, grows, slices or merges a cache, chooses between the
`past_key_values` and `cache` keywords, handles the encoder-decoder cache, or hooks a layer;
tests/test_boundary.py checks that no other module does. Everything else speaks in softprompt's
own terms: a KV prefix `(L, 2, H_kv, P, D)` per row, and a running batch's cache as an opaque
handle passed back to these functions. The API of the installed release is detected from the
model's signatures, not guessed from version strings, and `check` turns a prefix that a model
would silently ignore into an error.
"""

from softprompt.hf.cache import (
                    GrowingCache,
                    Output,
                    cache_of,
                    call,
                    concat,
                    encdec_cache,
                    encdec_select,
                    forward,
                    from_layers,
                    keyword,
                    layers,
                    length,
                    new_cache,
                    placement,
                    reorder_rows,
                    repeat_rows,
                    select,
                    to_prefix,
)
from softprompt.hf.check import PrefixIgnored, once
from softprompt.hf.errors import UnsupportedModel
from softprompt.hf.hooks import (
                    additive_mask,
                    cross_attention_kv,
                    decoder_layers,
                    decoder_position_shift,
                    eager_attention,
                    encoder_prefix,
                    gradient_checkpointing,
                    layer_outputs,
                    lm_head_at,
                    stack_layers,
)

__all__ = [
    "GrowingCache", "Output", "PrefixIgnored", "UnsupportedModel", "additive_mask", "cache_of", "call", "concat",
    "cross_attention_kv", "decoder_layers", "decoder_position_shift", "eager_attention", "encdec_cache", "encdec_select",
    "encoder_prefix", "forward", "from_layers", "gradient_checkpointing", "keyword", "layer_outputs", "layers", "length",
    "lm_head_at", "new_cache", "once", "placement", "reorder_rows", "repeat_rows", "select", "stack_layers", "to_prefix",
]
