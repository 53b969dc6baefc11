"""Helpers of the resume tests: kill a real training process, and compare two run folders exactly."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from cxrbench.train.common import CHECKPOINT, load_checkpoint

#: the only metrics columns allowed to differ between a resumed and an uninterrupted run
TIMING = ["seconds", "images_per_s"]


def _logged_rows(path: Path) -> int:
    try:
        return len(pd.read_csv(path))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def kill_after_rows(cmd: Sequence[str], out: Path, env: dict[str, str], rows: int,
                    timeout: float = 240) -> pd.DataFrame:
    """Run ``cmd``, SIGKILL it once ``out/metrics.csv`` has ``rows`` rows; the log as the kill left it."""
    proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and _logged_rows(out / "metrics.csv") < rows:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be interrupted: " + proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return pd.read_csv(out / "metrics.csv")


def assert_same_run(ref: Path, run: Path, epochs: int,
                    weights: Sequence[str] = ("best.safetensors", "bundle/model.safetensors")) -> None:
    """``run`` logged epochs 1..``epochs`` once each, with ``ref``'s metrics (timings aside), and ends with
    bit-identical best, bundle and checkpointed weights."""
    a, b = pd.read_csv(ref / "metrics.csv"), pd.read_csv(run / "metrics.csv")
    assert list(b["epoch"]) == list(range(1, epochs + 1))
    pd.testing.assert_frame_equal(a.drop(columns=TIMING), b.drop(columns=TIMING))
    for name in weights:
        want, got = load_file(str(ref / name)), load_file(str(run / name))
        assert want.keys() == got.keys(), name
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{name}: {k}")
    want, got = load_checkpoint(ref / CHECKPOINT)["model"], load_checkpoint(run / CHECKPOINT)["model"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{CHECKPOINT}: {k}")
