"""softprompt: prompt tuning, prefix tuning and P-tuning on a frozen language model."""

__version__ = "0.1.0"
