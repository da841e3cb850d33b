"""Floor 0, imports nothing else of softprompt: the attention geometry and identity of a base
(geometry.py), where and in what precision it runs (device.py), the defaults every entry point
shares (defaults.py), crash-safe writes (atomic.py) and the int8 matmul kernels (int8_kernels.py).
The floors are drawn in docs/architecture.md and held by tests/test_layering.py."""
