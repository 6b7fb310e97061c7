"""Properties of common/runtime.py, common/config.py, common/checkpoint.py and common/report.py."""

import json
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from common import runtime
from common.checkpoint import atomic_write_json, load_checkpoint, load_model_state, save_checkpoint
from common.config import UserError, field_comments, parse_config, run_main
from common.report import Progress, format_seconds, format_table, print_report, write_report

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------- runtime
def test_cpu_setup_is_float32_without_autocast():
    rt = runtime.setup(device="cpu", seed=3)
    assert rt.device == torch.device("cpu") and rt.dtype == torch.float32
    assert isinstance(rt.autocast(), contextlib.nullcontext)
    assert not rt.scaler.is_enabled()
    assert rt.is_main and rt.world_size == 1 and not rt.ddp
    model = torch.nn.Linear(2, 2)
    assert rt.wrap(model) is model


def test_cpu_bfloat16_autocast_when_asked():
    rt = runtime.setup(device="cpu", dtype="bfloat16")
    with rt.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16


def test_seeding_makes_runs_repeatable():
    runtime.setup(device="cpu", seed=123)
    first = torch.randn(5)
    runtime.setup(device="cpu", seed=123)
    assert torch.equal(first, torch.randn(5))


def test_bad_device_and_dtype_are_user_errors():
    with pytest.raises(UserError, match="unknown device"):
        runtime.setup(device="tpu")
    with pytest.raises(UserError, match="unknown dtype"):
        runtime.setup(device="cpu", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            runtime.setup(device="cuda")


def test_compile_falls_back_with_one_warning(monkeypatch, capsys):
    rt = runtime.setup(device="cpu", compile=True)
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    model = torch.nn.Linear(2, 2)
    assert rt.maybe_compile(model) is model
    assert "warning: --compile ignored: no C++ compiler" in capsys.readouterr().out
    rt_off = runtime.setup(device="cpu", compile=False)
    assert rt_off.maybe_compile(model) is model


def test_cpu_peak_keeps_the_best_measurement_and_mfu_is_a_fraction(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFS_CACHE", str(tmp_path))
    measurements = iter([1e11, 4e10, 2e11])          # the second one taken while the machine was busy
    monkeypatch.setattr(runtime, "measure_cpu_peak_flops", lambda: next(measurements))
    assert runtime.peak_flops("cpu") == 1e11
    assert runtime.peak_flops("cpu") == 1e11          # a slower measurement does not lower the peak
    assert (tmp_path / "cpu_peak_flops.json").exists()
    assert runtime.estimate_mfu(1e6, 1e4, "cpu") == pytest.approx(0.05)   # against the new best, 2e11


def test_cpu_mfu_never_exceeds_100_percent(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFS_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime, "measure_cpu_peak_flops", lambda: 1e9)      # measured on a busy machine
    assert runtime.estimate_mfu(1e6, 5e3, "cpu") == pytest.approx(1.0)      # 5e9 achieved: the peak rises
    assert runtime.peak_flops("cpu") == 5e9                                 # and stays there
    lines = []
    progress = Progress(total_iters=3, tokens_per_iter=10_000, log=lines.append, log_interval=1,
                        flops_per_token=1e7, device="cpu")
    for it in range(3):
        progress.step(it, loss=1.0)
    mfus = [float(line.split("MFU ")[1].split("%")[0]) for line in lines if "MFU" in line]
    assert mfus and all(0 < mfu <= 100.0 for mfu in mfus)


def test_measured_cpu_peak_is_plausible():
    flops = runtime.measure_cpu_peak_flops(size=256, repeats=2)
    assert 1e8 < flops < 1e14


def test_ddp_on_cpu_equals_one_process_on_the_full_batch(tmp_path):
    """Two gloo ranks, each with half the batch, end with identical parameters equal to one process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(TESTS / "ddp_check.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    sys.path.insert(0, str(TESTS))
    import ddp_check
    model, inputs, targets = ddp_check.make_model_and_batch()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ddp_check.train(model, inputs, targets)
    for name, value in model.state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6)
        assert not torch.equal(value, initial[name])        # training moved the parameters


# -------------------------------------------------------------------------------------------- config
@dataclass
class ExampleConfig:
    n_layer: int = 4          # Transformer blocks
    lr: float = 3e-3          # peak learning rate
    compile: bool = False     # compile the model with torch.compile
    data: str = "pydocs"      # corpus name or path


PRESETS = {"tiny": {"n_layer": 1, "lr": 1e-2}, "big": {"n_layer": 12}}


def test_flags_presets_and_precedence():
    assert parse_config(ExampleConfig, PRESETS, argv=[]) == ExampleConfig()
    assert parse_config(ExampleConfig, PRESETS, argv=["--preset", "tiny"]) == ExampleConfig(n_layer=1, lr=1e-2)
    cfg = parse_config(ExampleConfig, PRESETS, argv=["--preset", "tiny", "--lr", "5e-4", "--compile"])
    assert cfg == ExampleConfig(n_layer=1, lr=5e-4, compile=True)
    assert parse_config(ExampleConfig, PRESETS, argv=["--compile", "false"]).compile is False
    assert parse_config(ExampleConfig, PRESETS, argv=["--data", "my.txt"]).data == "my.txt"


def test_help_shows_field_comments(capsys):
    assert field_comments(ExampleConfig)["lr"] == "peak learning rate"
    with pytest.raises(SystemExit) as exit_info:
        parse_config(ExampleConfig, PRESETS, argv=["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "Transformer blocks" in help_text and "tiny (n_layer=1" in help_text
    assert "(default: 0.003)" in help_text and "(default: None)" not in help_text   # each default said once


@dataclass
class RunConfig:
    tasks: str = "a,b"                # tasks to finetune on
    out_dir: str = "out/05_gpt"       # where the run's files go


def test_each_preset_has_its_own_out_dir_unless_told():
    presets = {"tiny": {}, "default": {}, "gpu": {"out_dir": "runs/gpu"}}
    assert parse_config(RunConfig, presets, argv=[]).out_dir == "out/05_gpt"
    assert parse_config(RunConfig, presets, argv=["--preset", "default"]).out_dir == "out/05_gpt"
    assert parse_config(RunConfig, presets, argv=["--preset", "tiny"]).out_dir == "out/05_gpt-tiny"
    assert parse_config(RunConfig, presets, argv=["--preset", "tiny", "--out_dir", "x"]).out_dir == "x"
    assert parse_config(RunConfig, presets, argv=["--preset", "gpu"]).out_dir == "runs/gpu"


def test_flags_are_never_abbreviated(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(RunConfig, {}, argv=["--task", "x.jsonl"])     # argparse alone would read --tasks
    assert exit_info.value.code == 2
    assert "unknown flag --task (did you mean --tasks?" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--n_layr", "3"], "unknown flag --n_layr (did you mean --n_layer?"),
    (["--preset", "huge"], "unknown preset 'huge' (valid presets: tiny, big)"),
    (["--n_layer", "three"], "invalid int value"),
    (["--compile", "maybe"], "expected true or false"),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(ExampleConfig, PRESETS, argv=argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_run_main_turns_user_errors_into_one_line(capsys):
    def main():
        raise UserError("data file not found: nope.txt")
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: data file not found: nope.txt\n"


# ---------------------------------------------------------------------------------------- checkpoint
def test_checkpoint_roundtrip_with_plain_values(tmp_path):
    state = {"model": torch.nn.Linear(3, 2).state_dict(), "config": {"n_layer": 2}, "iter": 7}
    save_checkpoint(tmp_path / "ckpt.pt", state)
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded["iter"] == 7 and loaded["config"] == {"n_layer": 2}
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]    # no temporary file left behind


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"iter": 1})

    def crash(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"iter": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["iter"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_bad_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(UserError, match="garbage.pt is not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")


class Arbitrary:
    """An object that weights_only loading must refuse to unpickle."""


def test_checkpoints_never_unpickle_arbitrary_objects(tmp_path):
    torch.save({"payload": Arbitrary()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_mismatched_model_state_is_a_user_error():
    state = torch.nn.Linear(4, 2).state_dict()
    with pytest.raises(UserError, match="does not match this model's config"):
        load_model_state(torch.nn.Linear(8, 2), state, "ckpt.pt")


# -------------------------------------------------------------------------------------------- report
def test_progress_lines_show_loss_lr_throughput_and_eta():
    lines = []
    progress = Progress(total_iters=20, tokens_per_iter=100, log=lines.append, log_interval=5)
    for it in range(20):
        progress.step(it, loss=torch.tensor(2.5), lr=1e-3)
    assert len(lines) == 5                                  # first iteration, then every 5th
    assert lines[-1].startswith("iter 20/20 | loss 2.5000 | lr 1.00e-03 |")
    assert "tok/s" in lines[-1] and "ETA" in lines[-1]


def test_report_table_and_json(tmp_path, capsys):
    report = {"chapter": "05_gpt", "device": "cpu", "pretrain": {"val_loss": 3.25, "seconds": 61.0},
              "finetune": {"python-qa": {"metric": "val_loss", "pretrained": 2.1, "scratch": 3.3, "seconds": 40.0}}}
    print_report(report)
    out = capsys.readouterr().out
    assert "python-qa" in out and "val_loss" in out and "2.1000" in out
    write_report(tmp_path / "report.json", report)
    assert (tmp_path / "report.json").read_text().startswith("{")
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert format_seconds(80) == "1m20s" and format_seconds(4.25) == "4.2s"
    assert format_table([{"a": 1.5}], ["a", "b"]).splitlines()[2].split() == ["1.5000", "-"]


# -------------------------------------------------------------------------------------------- Ctrl-C
def test_stop_flag_turns_the_first_ctrl_c_into_a_request_and_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    with runtime.StopFlag(message="") as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)          # the first Ctrl-C: no exception, a request
        deadline = time.time() + 5
        while not stop.requested and time.time() < deadline:
            time.sleep(0.01)
        assert stop.requested
        assert signal.getsignal(signal.SIGINT) is before     # so a second Ctrl-C interrupts at once
    assert signal.getsignal(signal.SIGINT) is before


def test_a_stage_updates_its_part_of_the_report_and_keeps_the_rest(tmp_path):
    path = tmp_path / "report.json"
    write_report(path, {"chapter": "05_gpt", "pretrain": {"val_loss": 4.0},
                        "finetune": {"python-qa": {"pretrained": 3.5}, "docstring-module": {"pretrained": 0.8}}})
    merged = write_report(path, {"finetune": {"python-qa": {"pretrained": 3.4}}, "samples": ["x"]})
    assert merged == json.loads(path.read_text())
    assert merged["pretrain"] == {"val_loss": 4.0} and merged["samples"] == ["x"]
    assert merged["finetune"] == {"python-qa": {"pretrained": 3.4}, "docstring-module": {"pretrained": 0.8}}
    path.write_text("{ not json")
    messages = []
    assert write_report(path, {"pretrain": {"val_loss": 3.9}}, log=messages.append) == {"pretrain": {"val_loss": 3.9}}
    assert "not a readable report" in messages[0]


def test_a_run_with_another_config_never_takes_over_a_finished_runs_folder(tmp_path):
    from common.checkpoint import claim_out_dir
    config = {"n_layer": 4, "vocab_size": 1024, "lr": 1e-3}
    claim_out_dir(tmp_path, config, ["n_layer", "vocab_size"])
    claim_out_dir(tmp_path, {**config, "lr": 3e-3}, ["n_layer", "vocab_size"])      # same model: goes on
    with pytest.raises(UserError, match=r"holds a run with another config: n_layer 4 \(now 1\).*--out_dir"):
        claim_out_dir(tmp_path, {**config, "n_layer": 1}, ["n_layer", "vocab_size"])
    assert json.loads((tmp_path / "run.json").read_text())["config"]["n_layer"] == 4
    (tmp_path / "run.json").write_text("nope")
    with pytest.raises(UserError, match="corrupt"):
        claim_out_dir(tmp_path, config, ["n_layer"])
