"""Errors of the boundary with transformers."""


class UnsupportedModel(RuntimeError):
    """A model cannot take a prefix the way softprompt gives it (architecture or transformers
    release); the message names the versions and what to do."""


class PrefixIgnored(UnsupportedModel):
    """The self-check found that a model does not honour a KV prefix exactly (dropped, or
    applied at the wrong positions): generating would silently give other outputs."""
