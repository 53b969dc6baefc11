"""The cxrbench command: --help/--version, data sub-commands, one-line errors with exit codes."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from cxrbench import __version__
from cxrbench.cli.main import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "data" in out and "COMMAND" in out


def test_console_script_is_installed():
    exe = subprocess.run([sys.executable, "-m", "cxrbench.cli", "--version"], capture_output=True, text=True)
    assert exe.returncode == 0 and "cxrbench" in exe.stdout


def _imported_modules(importtime_stderr: str) -> set[str]:
    """The module names a ``python -X importtime`` run printed on stderr."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_data_list_starts_without_importing_torch():
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "cxrbench.cli", "data", "list"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "nih-chestxray14" in run.stdout
    modules = _imported_modules(run.stderr)
    assert "cxrbench.data.catalog" in modules  # the parse saw the run
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}


_HELP_OF_EVERY_COMMAND = """
import argparse, contextlib, io, sys
from cxrbench.cli.main import build_parser, main

def leaves(parser, prefix):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # argparse has no public walk
    if not subs:
        return [prefix]
    return [leaf for name, p in subs[0].choices.items() for leaf in leaves(p, [*prefix, name])]

commands = leaves(build_parser(), [])
for command in commands:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        main([*command, "--help"])
    assert "usage: cxrbench " + " ".join(command) in out.getvalue(), command
print(len(commands), sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_help_of_every_command_imports_no_torch():
    run = subprocess.run([sys.executable, "-c", _HELP_OF_EVERY_COMMAND], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    n_commands, torch_modules = run.stdout.split(" ", 1)
    assert int(n_commands) >= 15 and torch_modules.strip() == "[]"


_DEMO_WITHOUT_TORCH = """
import json, sys
from pathlib import Path
from cxrbench.app.demo import DemoSettings, _fingerprint, demo_data, prepare_demo
assert not [m for m in sys.modules if m.split(".")[0] == "torch"], "import cxrbench.app.demo imported torch"
out, data = Path(sys.argv[1]), sys.argv[2]
for name in ("classifier", "ood"):  # bundles the cache check finds (it reads nothing but their card's presence)
    (out / name).mkdir(parents=True)
    (out / name / "card.json").write_text("{}")
train_dir, kind = demo_data(data)
(out / "demo.json").write_text(json.dumps({"fingerprint": _fingerprint(train_dir, DemoSettings()),
                                           "classifier": str(out / "classifier"), "ood": str(out / "ood")}))
info = prepare_demo(out, data=data, progress=False)
assert info["classifier"] == str(out / "classifier"), info
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""


def test_the_demo_module_and_an_up_to_date_demo_prepare_import_no_torch(tmp_path, nih_dir):
    """`cxrbench demo serve` with bundles already trained starts Voila without paying for torch (~2 s, 0.7 GB)."""
    run = subprocess.run([sys.executable, "-c", _DEMO_WITHOUT_TORCH, str(tmp_path / "demo"), str(nih_dir)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_train_commands_share_their_data_options():
    """train classifier, ood and autoencoder take --split/--seed/--workers/--device/--max-steps from one definition
    (cxrbench.cli.options.add_training_arguments): the same values, defaults and help in each."""
    import argparse

    from cxrbench.cli.main import build_parser

    parser = build_parser()
    argv = ["--split", "s.csv", "--seed", "5", "--workers", "2", "--device", "CUDA:1", "--max-steps", "3"]
    dests = ("split", "seed", "workers", "device", "max_steps")
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    commands = next(a for a in train._actions if isinstance(a, argparse._SubParsersAction)).choices
    definitions = []
    for command in ("classifier", "ood", "autoencoder"):
        args = parser.parse_args(["train", command, "--data", "d", "--out", "o", *argv])
        assert tuple(getattr(args, d) for d in dests) == ("s.csv", 5, 2, "cuda:1", 3), command
        defaults = parser.parse_args(["train", command, "--data", "d", "--out", "o"])
        assert tuple(getattr(defaults, d) for d in dests) == (None, 0, None, "auto", None), command  # workers: auto
        assert parser.parse_args(["train", command, "--data", "d", "--out", "o", "--workers", "AUTO"]).workers is None
        actions = [a for a in commands[command]._actions if a.dest in dests]
        definitions.append([(a.option_strings, a.default, a.help) for a in actions])
    assert definitions[0] == definitions[1] == definitions[2] and len(definitions[0]) == len(dests)
    assert definitions[0][0] == (["--split"], None, "split CSV to use (default: patient split 70/10/20)")


@pytest.mark.parametrize("given", ["-1", "two", "1.5"])
def test_workers_must_be_auto_or_a_count(given, capsys):
    with pytest.raises(SystemExit):
        main(["train", "classifier", "--data", "d", "--out", "o", "--workers", given])
    assert "--workers" in capsys.readouterr().err


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "nih-chestxray14" in out and "mura" in out


@pytest.mark.realdata
def test_data_check_ok_and_missing(shared_data, tmp_path, capsys):
    assert main(["data", "check", "nih", str(shared_data / "cxr" / "nih")]) == 0
    assert "verdict: OK" in capsys.readouterr().out
    copy = tmp_path / "nih"
    copy.mkdir()
    for f in (shared_data / "cxr" / "nih").iterdir():
        (copy / f.name).symlink_to(f)
    (copy / "00000030_001.png").unlink()
    assert main(["data", "check", "nih-chestxray14", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "1 listed files are missing" in out and "00000030_001.png" in out and "INCOMPLETE" in out


def test_data_phantoms_split_and_cache(tmp_path, capsys):
    root = tmp_path / "ph"
    assert main(["data", "phantoms", str(root), "-n", "10", "--size", "64"]) == 0
    assert main(["data", "split", str(root), "--out", str(tmp_path / "split.csv"), "--seed", "3"]) == 0
    split = pd.read_csv(tmp_path / "split.csv")
    assert len(split) == 10 and set(split["split"]) <= {"train", "val", "test"}
    assert main(["data", "cache", str(root), "--size", "32", "--cache-dir", str(tmp_path / "c"), "-q"]) == 0
    assert "10 decoded" in capsys.readouterr().out


def test_errors_are_one_line_with_exit_code(tmp_path, capsys):
    assert main(["data", "check", "no-such-dataset", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cxrbench: error: unknown dataset") and "Traceback" not in err
    assert main(["data", "split", str(tmp_path / "absent"), "--out", str(tmp_path / "s.csv")]) == 1
    assert "no such file or directory" in capsys.readouterr().err


def test_groups_build_the_parser_and_backend_is_an_ordinary_option(capsys):
    import importlib
    import re
    from pathlib import Path

    cli_main = importlib.import_module("cxrbench.cli.main")  # the module (cxrbench.cli.main is also the function)
    parser = cli_main.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    listed = capsys.readouterr().out
    order = ["data", "info", "train", "evaluate", "predict", "demo", "analyze", "segment", "explain", "ood-score",
             "ood-tradeoff", "export", "export-web"]
    positions = [re.search(rf"\n    {name}[ \n]", listed).start() for name in order]
    assert positions == sorted(positions), listed
    for command, extra in (("predict", ["--bundle", "b", "x.png", "--out", "o.csv"]),
                           ("analyze", ["--classifier", "c", "x.png", "--out", "o"]),
                           ("ood-score", ["--bundle", "b", "x.png", "--out", "o.csv"])):
        auto_args = parser.parse_args([command, *extra])
        torch_args = parser.parse_args([command, *extra, "--backend", "torch"])
        onnx_args = parser.parse_args([command, *extra, "--backend", "onnx"])
        assert (auto_args.backend, torch_args.backend, onnx_args.backend) == ("auto", "torch", "onnx")
        assert cli_main._handler(onnx_args) is onnx_args.func is torch_args.func is auto_args.func  # one handler
        with pytest.raises(SystemExit):
            parser.parse_args([command, *extra, "--backend", "tensorrt"])
    capsys.readouterr()
    cli_sources = "".join(p.read_text() for p in Path(cli_main.__file__).parent.glob("*.py"))
    assert "_option_string_actions" not in cli_sources  # no command is patched after it is built
