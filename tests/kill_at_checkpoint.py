"""Kill a training run (``python -m fastxc.train`` flags) at a known checkpoint, for the
kill-and-resume tests of test_train.py and test_sweep.py."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PAUSING_TRAINER = Path(__file__).with_name("pausing_trainer.py")  # see its docstring


def kill_at_checkpoint(args, out, stop_at):
    """Run the trainer until it is about to write the checkpoint of step ``stop_at``, then SIGKILL it."""
    marker, log = out.parent / f"{out.name}.paused", out.parent / f"{out.name}.stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(PAUSING_TRAINER), str(marker), str(stop_at), *args, "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the trainer never reached step {stop_at} (rc {proc.poll()}): {log.read_text()[-2000:]}")
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
