"""What goes to and comes from disk: loading a base (load.py, lora.py), prompt artifacts and their
cards (artifact.py, card_schema.py, card.py), classifier artifacts (classifier.py) and PEFT's
adapter format (peft.py)."""
