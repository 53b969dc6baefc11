"""benchmarks/gpu_train.py (issue 16, item 6) runs on CI's CPU in its ``--smoke`` form, so the script a GPU session
runs (rarely: few sessions get a device) has not rotted in between."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from cxrbench.train.runtime import precision_policy

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_train.py"


def test_gpu_train_smoke_trains_through_the_real_trainer_and_writes_its_table(shared_data, tmp_path):
    env = {**os.environ, "CXRBENCH_SHARED_DATA": str(shared_data)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "gpu_train_smoke.csv")
    assert len(table) == 1
    row = table.iloc[0]
    # 3 steps of batch 8 (--smoke), one process, the precision the trainer's policy picks on this CPU
    assert row["epoch_images"] == 24 and row["processes"] == 1 and row["batch"] == 8
    assert row["precision"] == precision_policy(torch.device("cpu")).describe()
    assert row["images_per_s"] > 0
    # nih_epoch_s comes from the unrounded rate, images_per_s is rounded to 0.1: at r img/s that rounding moves
    # 78,484 / r by up to nih_epoch_s * 0.05 / r (2.6 s at 38 img/s on a loaded CI machine), plus its own 0.05
    slack = 0.05 + row["nih_epoch_s"] * 0.05 / row["images_per_s"] + 1e-6
    assert abs(row["nih_epoch_s"] - 78_484 / row["images_per_s"]) <= slack
    assert not bool(row["cudnn_benchmark"]) and row["gpu_util"] == "n/a (no nvidia-smi)"
    assert "smoke" in (tmp_path / "gpu_train_smoke.md").read_text()


def test_gpu_train_refuses_to_run_without_cuda_unless_asked_for_the_cpu(shared_data, tmp_path):
    env = {**os.environ, "CXRBENCH_SHARED_DATA": str(shared_data), "CUDA_VISIBLE_DEVICES": ""}  # no GPU, anywhere
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "no CUDA device here" in done.stderr
    assert not list(tmp_path.iterdir())
