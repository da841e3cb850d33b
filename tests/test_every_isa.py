"""The tests whose outcome depends on the CPU's instructions, run again as other CPUs would run
them: the int8 and generation tests under the AVX2 cap (no AVX-512, no VNNI: int8 sums saturate
there unless inputs are 7-bit), and the int8 end-to-end test on the real model under torch's oldest
kernels. `softprompt.core.device.ISA_CAPS` holds each environment; each runs pytest in a child process,
since torch, oneDNN and MKL read it when they load. A change that works on one CPU only cannot
pass here, whichever CPU the suite runs on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt.core.device import ISA_CAPS

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "avx2": ["tests/test_quantize.py", "tests/test_generate.py"],
    "default": ["tests/test_embedded.py::test_cli_generate_on_the_int8_base_gives_float32s_answer"],
}
EXPECTED_ISA = {"avx2": "AVX2", "default": "DEFAULT"}


@pytest.mark.parametrize("isa", [pytest.param("avx2"), pytest.param("default", marks=pytest.mark.embedded)])
def test_the_cpu_dependent_tests_pass_under_another_isa(isa):
    if os.environ.get("SOFTPROMPT_ISA_RUN"):
        pytest.skip(f"already a run under the {os.environ['SOFTPROMPT_ISA_RUN']} cap")
    env = {**os.environ, **ISA_CAPS[isa], "SOFTPROMPT_ISA_RUN": isa}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=env, capture_output=True, text=True, check=True)
    if isa == "avx2" and probe.stdout.strip() not in ("AVX2",):
        pytest.skip(f"this CPU cannot run AVX2 kernels (torch reports {probe.stdout.strip()})")
    assert probe.stdout.strip() == EXPECTED_ISA[isa]  # the cap is in force in the child
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *RUNS[isa]],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout + done.stderr)[-4000:]
    print(tail)
    assert done.returncode == 0, f"under {ISA_CAPS[isa]}:\n{tail}"
    assert " passed" in tail.splitlines()[-1] and "skipped" not in tail.splitlines()[-1]
