"""The loops every family shares: reading and tokenizing data (data.py), decoding (generate.py),
evaluation (evaluate.py), the training loop (train.py) with its checkpoints (checkpoint.py) and
experiment tracking (tracking.py)."""
