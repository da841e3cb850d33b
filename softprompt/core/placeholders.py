"""The placeholder token ids that name a task version to vLLM (docs/vllm.md): a function of the
artifact's sha256 alone, so our server (serve/vllm_backend.py) and vLLM's connector
(softprompt/vllm/, in vLLM's own venv) agree without sharing anything but the store. Floor 0: the
connector imports it without the rest of the package."""

from __future__ import annotations

import hashlib

FIRST_ID = 256  # below: special and byte tokens in most vocabularies (never a placeholder)


def placeholder_ids(sha256: str, num_virtual_tokens: int, vocab_size: int) -> list[int]:
    """The `P` placeholder token ids of the task version whose artifact has this sha256: uniform over
    [FIRST_ID, vocab_size) from SHAKE-256 of the sha (the same on every machine and process)."""
    lo = FIRST_ID if vocab_size > 4 * FIRST_ID else 0  # a tiny test vocabulary has no room to skip
    span = vocab_size - lo
    raw = hashlib.shake_256(f"softprompt-vllm:{sha256}".encode()).digest(8 * num_virtual_tokens)
    return [lo + int.from_bytes(raw[8 * i:8 * i + 8], "little") % span for i in range(num_virtual_tokens)]
