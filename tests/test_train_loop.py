"""The one epoch loop: exact resume for every family, what a kill at each point leaves, early stopping, AMP policy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from resume_check import assert_same_run
from torch import nn
from torch.utils.data import TensorDataset

import cxrbench.train.loop as loop
from cxrbench.data import load_manifest
from cxrbench.data.synthetic import write_phantom_set
from cxrbench.train import (
    CheckpointError,
    ClassifierConfig,
    LoopResult,
    LoopSettings,
    OODConfig,
    TrainingParts,
    UNetConfig,
    run_training,
    train_classifier,
    train_ood,
    train_unet,
)
from cxrbench.train.classifier import ClassifierFamily
from cxrbench.train.common import CHECKPOINT, RunConfig, load_checkpoint, save_checkpoint
from cxrbench.train.ood import OODFamily
from cxrbench.train.runtime import loader_workers, pick_device, precision_policy, process_group_backend
from cxrbench.train.unet import UNetFamily


class _Killed(Exception):
    """Stands in for a kill: raised inside the loop at a chosen point."""


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """40 phantoms at 64 px with lung masks: data for all three families."""
    return write_phantom_set(tmp_path_factory.mktemp("ph") / "set", 40, size=64, seed=1)


def _classifier(df, out, **kw):
    cfg = ClassifierConfig(arch="resnet18", image_size=32, batch_size=8, epochs=3, eval_bootstrap=20,
                           early_stopping_patience=0, max_steps_per_epoch=2)  # augmentation on: global RNG matters
    return train_classifier(df, out, cfg, progress=False, cache_dir=out.parent / "cache", **kw)


def _ali(df, out, **kw):
    cfg = OODConfig(model="ali", latent_dim=16, width=8, batch_size=8, epochs=3)  # two optimizers, a noise generator
    return train_ood(df, out, cfg, progress=False, cache_dir=out.parent / "cache", **kw)


def _unet(df, out, **kw):
    cfg = UNetConfig(image_size=32, base_channels=4, depth=2, batch_size=4, epochs=3, max_steps_per_epoch=3)
    return train_unet(df, out, cfg, progress=False, **kw)


FAMILIES = {"classifier": (_classifier, ClassifierFamily), "ali": (_ali, OODFamily), "unet": (_unet, UNetFamily)}


@pytest.fixture(scope="module")
def reference(phantoms, tmp_path_factory):
    """``reference(family)``: the folder of that family's uninterrupted 3-epoch run (trained once)."""
    done: dict[str, Path] = {}

    def run(family: str) -> Path:
        if family not in done:
            done[family] = tmp_path_factory.mktemp(f"ref-{family}") / "ref"
            FAMILIES[family][0](load_manifest(phantoms), done[family])
        return done[family]

    return run


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_run_killed_mid_epoch_and_resumed_equals_an_uninterrupted_one(family, phantoms, reference, tmp_path,
                                                                        monkeypatch):
    train, family_cls = FAMILIES[family]
    df = load_manifest(phantoms)
    real_step, calls = family_cls.train_step, []

    def dying_step(self, *args):
        calls.append(1)
        if len(calls) == 4:  # in epoch 2 (3 steps or fewer per epoch)
            raise _Killed
        return real_step(self, *args)

    monkeypatch.setattr(family_cls, "train_step", dying_step)
    with pytest.raises(_Killed):
        train(df, tmp_path / "run")
    assert list(pd.read_csv(tmp_path / "run" / "metrics.csv")["epoch"]) == [1]
    monkeypatch.setattr(family_cls, "train_step", real_step)
    resumed = train(df, tmp_path / "run", resume=True)
    assert [h["epoch"] for h in resumed.history] == [2, 3] and resumed.epochs_run == 3
    assert_same_run(reference(family), tmp_path / "run", 3)


@pytest.mark.parametrize("family", ["classifier", "unet"])
def test_a_kill_between_checkpoint_and_log_loses_no_row_and_no_best_weights(family, phantoms, reference, tmp_path,
                                                                             monkeypatch):
    """Killed right after epoch 2's checkpoint: its row and its best weights come back from the checkpoint."""
    train, _ = FAMILIES[family]
    df = load_manifest(phantoms)
    real_save = loop.save_training_state

    def save_then_die(out, epoch, *args, **kwargs):
        real_save(out, epoch, *args, **kwargs)
        if epoch == 2:
            raise _Killed

    monkeypatch.setattr(loop, "save_training_state", save_then_die)
    with pytest.raises(_Killed):
        train(df, tmp_path / "run")
    run = tmp_path / "run"
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1] and load_checkpoint(run / CHECKPOINT)["epoch"] == 2
    assert (run / loop.PENDING_BEST).is_file()  # epoch 2 improved: its weights wait for the rename
    monkeypatch.setattr(loop, "save_training_state", real_save)
    resumed = train(df, run, resume=True)
    assert [h["epoch"] for h in resumed.history] == [3]
    assert not (run / loop.PENDING_BEST).exists()
    assert_same_run(reference(family), run, 3)


# --------------------------------------------------------------------------------------------------
# the loop's own rules, on a toy family


@dataclass
class _ToyConfig(RunConfig):
    epochs: int = 6
    seed: int = 0
    patience: int = 0
    device: str = "cpu"


class _ToyFamily:
    """Linear regression; ``validate`` hands out scripted values of ``val_loss``."""

    result_class = LoopResult

    def __init__(self, values, cfg: _ToyConfig | None = None, data_parallel: bool = True) -> None:
        self.config = cfg or _ToyConfig()
        self.settings = LoopSettings(epochs=self.config.epochs, batch_size=4, monitor="val_loss", mode="min",
                                     seed=self.config.seed, device="cpu", patience=self.config.patience,
                                     data_parallel=data_parallel)
        self.values, self.finished = iter(values), []

    def prepare(self, ctx):
        return TensorDataset(torch.randn(12, 3), torch.randn(12, 1))

    def build(self, ctx):
        self.model = ctx.place(nn.Linear(3, 1))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        return TrainingParts(self.model, {"sgd": self.opt})

    def train_step(self, model, batch, ctx):
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"train_loss": loss.detach()}

    def validate(self, model, ctx):
        return {"val_loss": next(self.values)}

    def finish(self, model, result, ctx):
        self.finished.append(result)


def test_early_stopping_counts_epochs_without_improvement_and_nan_never_improves(tmp_path):
    family = _ToyFamily([1.0, 0.5, math.nan, 0.7, 0.6], _ToyConfig(patience=3))
    with pytest.warns(RuntimeWarning, match="val_loss is nan"):
        result = run_training(family, tmp_path / "run", progress=False)
    assert result.stopped_early and result.epochs_run == 5 and (result.best_epoch, result.best_value) == (2, 0.5)
    assert family.finished == [result]
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics["best"]) == [1, 1, 0, 0, 0] and metrics["train_images"].eq(12).all()
    # a resumed run that had stopped early stays stopped, with the same best epoch
    again = run_training(_ToyFamily([], _ToyConfig(patience=3, epochs=9)), tmp_path / "run", resume=True,
                         progress=False)
    assert again.stopped_early and again.epochs_run == 5 and again.best_epoch == 2 and again.history == []


def test_a_fresh_run_clears_the_stale_state_of_an_earlier_run(tmp_path):
    run = tmp_path / "run"
    run_training(_ToyFamily([1.0, 0.5, 0.4, 0.3, 0.2, 0.1]), run, progress=False)
    assert (run / "best.safetensors").is_file()
    with pytest.warns(RuntimeWarning, match="nan"):
        result = run_training(_ToyFamily([math.nan] * 6), run, overwrite=True, progress=False)  # never improves
    assert result.best_epoch == 0 and math.isnan(result.best_value)
    assert not (run / "best.safetensors").exists()  # not the earlier run's weights
    assert list(pd.read_csv(run / "metrics.csv")["best"]) == [0] * 6


def test_the_loop_refuses_a_missing_monitor_an_old_checkpoint_and_torchrun_for_one_process_families(
        tmp_path, monkeypatch):
    with pytest.raises(KeyError, match="returned no 'val_loss'"):
        family = _ToyFamily([])
        family.validate = lambda model, ctx: {"val_auc": 0.5}
        run_training(family, tmp_path / "a", progress=False)
    run_training(_ToyFamily([1.0] * 6), tmp_path / "b", progress=False)
    ckpt = load_checkpoint(tmp_path / "b" / CHECKPOINT)
    save_checkpoint(tmp_path / "b" / CHECKPOINT, {k: v for k, v in ckpt.items() if k != "format"})
    with pytest.raises(CheckpointError, match="checkpoint format 1 .* start a new run folder"):
        run_training(_ToyFamily([]), tmp_path / "b", resume=True, progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="does not train data-parallel"):
        run_training(_ToyFamily([], data_parallel=False), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_the_amp_policy_is_bf16_and_channels_last_on_cuda_and_bf16_cpus_and_is_recorded(tmp_path):
    cuda = precision_policy(torch.device("cuda", 0))
    assert cuda.autocast_dtype == torch.bfloat16 and cuda.channels_last
    assert cuda.describe() == "bf16 autocast, channels_last" and cuda.reason == "auto: CUDA"
    assert precision_policy(torch.device("cuda"), amp=False).describe() == "fp32, channels_last"
    cpu = torch.device("cpu")
    plain = precision_policy(cpu, flags={"fpu", "avx2", "fma", "avx512f"})
    assert plain.autocast_dtype is None and not plain.channels_last and plain.describe() == "fp32"
    assert plain.reason == "auto: the CPU has no avx512_bf16 or AMX"
    for flags, named in (({"avx2", "avx512_bf16"}, "avx512_bf16"), ({"amx_tile", "amx_bf16"}, "amx_bf16")):
        fast = precision_policy(cpu, flags=flags)
        assert fast.describe() == "bf16 autocast, channels_last" and fast.reason == f"auto: the CPU has {named}"
    assert precision_policy(cpu, amp=False, flags={"avx512_bf16"}).describe() == "fp32, channels_last"
    off = precision_policy(cpu, mode="fp32", flags={"avx512_bf16"})  # --precision fp32 turns it off
    assert off.describe() == "fp32" and off.reason == "fp32 asked for"
    forced = precision_policy(cpu, mode="bf16", flags=set())
    assert forced.describe() == "bf16 autocast, channels_last" and forced.reason == "bf16 asked for"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        precision_policy(cpu, mode="fp16")
    result = run_training(_ToyFamily([1.0] * 6), tmp_path / "run", progress=False)
    assert result.precision == "fp32"  # the toy family does not ask for amp


def test_cpu_flags_come_from_proc_cpuinfo(tmp_path):
    from cxrbench.train.runtime import cpu_flags, cpu_has_fast_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert cpu_has_fast_bf16(cpu_flags(info)) and not cpu_has_fast_bf16({"avx2"})
    assert cpu_flags(tmp_path / "missing") == frozenset()
    if Path("/proc/cpuinfo").is_file():  # this machine's verdict is what its flags say
        words = set(Path("/proc/cpuinfo").read_text().split())
        assert cpu_has_fast_bf16() == bool({"avx512_bf16", "amx_bf16"} & words)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="mode must be"):
        LoopSettings(epochs=1, batch_size=1, monitor="val_loss", mode="lowest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="patience >= 0"):
        LoopSettings(epochs=1, batch_size=1, monitor="val_loss", mode="min", patience=-1)


def test_auto_loader_workers_are_none_on_the_cpu_and_a_share_of_the_cores_on_a_gpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert loader_workers(None, cpu, cpus=64) == (0, "auto: none on the CPU")  # the training threads use the cores
    assert loader_workers(None, cuda, 1, cpus=16) == (8, "auto: cuda, 16 CPUs")  # at most LOADER_WORKERS_CAP
    assert loader_workers(None, cuda, 2, cpus=16) == (7, "auto: cuda, 16 CPUs for each of 2 processes")
    assert loader_workers(None, cuda, 1, cpus=4)[0] == 3  # one core for the process itself
    assert loader_workers(None, cuda, 4, cpus=2)[0] == 1  # at least one
    assert loader_workers(None, torch.device("mps"), 1, cpus=1)[0] == 1
    assert loader_workers(3, cuda, cpus=16) == (3, "3 asked for") and loader_workers(0, cuda, cpus=16)[0] == 0
    assert loader_workers(5, cpu) == (5, "5 asked for")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's count of this node's processes
    assert loader_workers(None, cuda, cpus=16) == (3, "auto: cuda, 16 CPUs for each of 4 processes")
    with pytest.raises(ValueError, match="must be >= 0"):
        loader_workers(-1, cuda)


def test_torchrun_processes_that_share_a_gpu_use_gloo_and_the_gpus_there_are(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert process_group_backend(cuda, local_processes=2, gpus=2) == "nccl"  # a GPU each
    assert process_group_backend(cuda, local_processes=2, gpus=1) == "gloo"  # NCCL refuses a shared GPU
    assert process_group_backend(cpu, local_processes=2, gpus=0) == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of `torchrun --nproc_per_node 2` on one GPU
    assert pick_device("auto") == cuda
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda", 1)
