"""``python tests/pausing_trainer.py MARKER STEP [train flags]``: ``python -m fastxc.train`` that,
asked for the checkpoint of step STEP, creates MARKER (MARKER.<rank> under torchrun) and waits
to be killed.

The kill-and-resume tests kill on that signal, at a known step whatever the machine's speed:
after metrics.jsonl got the step's line and before its checkpoint exists, with the previous
checkpoint complete on disk.
"""
import os
import pathlib
import runpy
import sys
import time

from fastxc.train import checkpoint

marker, stop_at = sys.argv[1], int(sys.argv[2])
if "RANK" in os.environ:
    marker = f"{marker}.{os.environ['RANK']}"
real_save = checkpoint.save


def save(out, model, opt, ctx, state):
    if state["step"] == stop_at:
        pathlib.Path(marker).touch()
        while True:
            time.sleep(60)
    real_save(out, model, opt, ctx, state)


checkpoint.save = save
sys.argv = ["fastxc.train", *sys.argv[3:]]
runpy.run_module("fastxc.train", run_name="__main__")
