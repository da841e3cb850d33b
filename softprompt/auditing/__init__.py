"""The audit of a prefix (`softprompt audit`, `softprompt.audit(...)`): one report a reviewer who
never saw the training can sign off (docs/audit.md).

provenance.py reads what the card, the run and the store recorded; behaviour.py compares the base's
and the prefixed model's answers on task inputs and on the shipped off-task probes; discrete.py
finds a hard prompt that imitates the prefix and says how well; report.py gives the verdict and
writes JSON, markdown and a self-contained HTML page. Importing this package loads nothing heavy
(the CLI imports it for `--help`)."""

from softprompt.auditing.config import AuditConfig
from softprompt.auditing.run import audit  # light at import: its work imports torch when it runs

__all__ = ["AuditConfig", "audit"]
