"""The run-folder helpers every training loop shares: config keys, resume, exact state restore, split."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from torch import nn

from cxrbench.data import SplitError
from cxrbench.train.common import (
    CheckpointError,
    MetricLog,
    RunConfig,
    best_weights_epoch,
    load_best,
    open_run,
    restore_training_state,
    rng_state,
    run_split,
    save_best,
    save_training_state,
)


@dataclass
class _Cfg(RunConfig):
    RESUME_MAY_CHANGE = ("epochs", "device")

    lr: float = 0.1
    epochs: int = 2
    betas: tuple[float, float] = (0.9, 0.99)
    device: str = "cpu"


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    gen = torch.Generator().manual_seed(seed)
    return model, {"optimizer": opt, "scheduler": sched, "loader_rng": gen, "nested": {"d": opt}}


def _step(model, stateful):
    x = torch.randn(8, 4, generator=stateful["loader_rng"]) + torch.rand(1)  # loader rng + global rng
    loss = model(x).pow(2).mean()
    stateful["optimizer"].zero_grad()
    loss.backward()
    stateful["optimizer"].step()
    stateful["scheduler"].step()


def test_resume_key_drops_only_the_changeable_fields_and_is_plain_json():
    key = _Cfg().resume_key()
    assert set(key) == {"lr", "betas"} and key["betas"] == [0.9, 0.99]
    assert _Cfg.from_dict({**_Cfg().to_dict(), "unknown": 1}) == _Cfg()


def test_restored_state_continues_exactly_like_an_uninterrupted_run(tmp_path):
    model, st = _setup()
    for _ in range(3):
        _step(model, st)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, st = _setup()
    _step(model, st)
    save_training_state(tmp_path, 1, model, st, _Cfg(), best_value=0.5)
    for _ in range(5):  # the state moves on after the checkpoint (a run killed later in the epoch)
        _step(model, st)
    fresh_model, fresh_st = _setup(seed=123)
    ckpt = open_run(tmp_path, _Cfg(epochs=9), resume=True)
    assert ckpt is not None and ckpt["best_value"] == 0.5
    assert restore_training_state(ckpt, fresh_model, fresh_st) == 2
    for _ in range(2):
        _step(fresh_model, fresh_st)
    for k, v in fresh_model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)


def test_open_run_names_the_settings_that_differ(tmp_path):
    assert open_run(tmp_path, _Cfg(), resume=True) is None  # nothing to resume: a fresh run
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.1
    model, st = _setup()
    save_training_state(tmp_path, 1, model, st, _Cfg())
    with pytest.raises(CheckpointError, match=r"lr differ.*only epochs, device may change"):
        open_run(tmp_path, _Cfg(lr=0.2), resume=True)
    assert open_run(tmp_path, _Cfg(lr=0.2), resume=False) is None  # not resuming: a new run, new config
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.2
    (tmp_path / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="checkpoint.pt: cannot read checkpoint"):
        open_run(tmp_path, _Cfg(), resume=True)


def test_best_weights_round_trip(tmp_path):
    model, _ = _setup()
    save_best(model, tmp_path)
    other, _ = _setup(seed=7)
    load_best(other, tmp_path)
    assert not other.training
    torch.testing.assert_close(other.weight, model.weight)
    untouched, _ = _setup(seed=7)
    load_best(untouched, tmp_path / "absent")  # no best file: weights stay as they are
    torch.testing.assert_close(untouched.weight, _setup(seed=7)[0].weight)


def test_run_split_is_reused_on_resume_only_with_its_settings_and_refuses_an_empty_val(tmp_path):
    df = pd.DataFrame({"path": [f"{i}.png" for i in range(20)], "image_id": [f"{i}.png" for i in range(20)],
                       "patient_id": [str(i // 2) for i in range(20)]})
    s = run_split(df, tmp_path, (0.6, 0.2, 0.2), seed=3)
    assert (tmp_path / "split.csv").is_file() and set(s) == {"train", "val", "test"}
    assert (run_split(df, tmp_path, (0.6, 0.2, 0.2), seed=3) == s).all()  # reused on resume
    with pytest.raises(SplitError, match="seed 3 there, 99 now; fractions 0.6/0.2/0.2 there, 0.5/0.25/0.25 now"):
        run_split(df, tmp_path, (0.5, 0.25, 0.25), seed=99)  # never silently the old split under new settings
    with pytest.raises(ValueError, match="no 'val' images"):
        run_split(df, tmp_path / "other", (0.8, 0.0, 0.2), seed=0, split=pd.Series(["train"] * 20))
    assert not (tmp_path / "other").exists()  # checked before it is written


def test_each_rank_takes_its_own_random_states_and_a_missing_rank_is_warned(tmp_path):
    model, st = _setup()
    torch.manual_seed(11)
    rank0 = rng_state()
    torch.manual_seed(22)
    rank1 = rng_state()
    save_training_state(tmp_path, 1, model, st, _Cfg(), rng=[rank0, rank1])
    ckpt = open_run(tmp_path, _Cfg(), resume=True)
    restore_training_state(ckpt, model, st, rank=1)
    assert torch.equal(torch.get_rng_state(), rank1["torch"])
    with pytest.warns(RuntimeWarning, match="random states of 2 ranks; rank 2 takes rank 0's"):
        restore_training_state(ckpt, model, st, rank=2)
    assert torch.equal(torch.get_rng_state(), rank0["torch"])


def test_best_weights_record_their_epoch_and_the_log_its_last_epoch(tmp_path):
    model, _ = _setup()
    assert best_weights_epoch(save_best(model, tmp_path, 7)) == 7
    assert best_weights_epoch(save_best(model, tmp_path)) is None and best_weights_epoch(tmp_path / "absent") is None
    log = MetricLog(tmp_path / "metrics.csv")
    assert log.last_epoch() == 0
    log.append({"epoch": 1, "loss": 0.5})
    log.append({"epoch": 2, "loss": 0.25, "new_column": 1})
    assert log.last_epoch() == 2 and log.rows()[0]["new_column"] == ""
    log.truncate_after(1)
    assert [r["epoch"] for r in log.rows()] == ["1"]
