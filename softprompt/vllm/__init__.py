"""Our tasks inside vLLM (docs/vllm.md): `tasks.py` (placeholder ids, the store's compiled prefixes,
torch and safetensors only) and `connector.py` (vLLM's KV connector; imports vllm). Runs in vLLM's own
environment (.venv-vllm, scripts/setup-vllm.sh); nothing else in the package imports it."""

from softprompt.vllm.tasks import FIRST_ID, TaskIndex, placeholder_ids, read_prefix

__all__ = ["FIRST_ID", "TaskIndex", "placeholder_ids", "read_prefix"]
