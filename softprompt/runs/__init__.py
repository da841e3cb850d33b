"""Jobs built from the floors below: a training run from its configuration (train.py; classification
in classify.py), the side-by-side comparison (compare.py), the demo (demo.py), prompt inspection
(inspect.py), and the public Python API (api.py, exported from the package root)."""
