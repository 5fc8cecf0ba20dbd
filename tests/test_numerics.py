"""Pinned CPU numerics (fastxc.core.numerics): what the organism pipeline's reproducibility rests on."""
import json
import subprocess
import sys

import torch

from fastxc.core import numerics


def test_the_test_session_is_pinned():
    """conftest pins before torch starts, so the organism acceptance runs on the pinned kernels."""
    assert numerics.is_pinned(), numerics.describe()
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"


def test_a_child_started_unpinned_pins_itself_before_torch():
    """pin() in a fresh process (as ``python -m fastxc.train`` does) takes effect; after torch
    has started it cannot, and says so."""
    env = {k: v for k, v in numerics.pinned_env().items() if k not in numerics.PINNED_ENV}
    code = ("import json, sys; from fastxc.core import numerics; ok = numerics.pin(); import torch; "
            "print(json.dumps([ok, numerics.describe()]))")
    ok, info = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                         text=True, check=True).stdout)
    assert ok and info["aten_capability"] == "AVX2" and info["MKL_CBWR"] == "AVX2,STRICT"
    late = ("import torch; torch.ones(2).sum(); from fastxc.core import numerics; print(numerics.pin())")
    assert subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_import_fastxc_loads_no_torch():
    """Entry points can pin numerics only because importing the package starts no torch."""
    code = "import sys, fastxc, fastxc.cli, fastxc.core.numerics; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
