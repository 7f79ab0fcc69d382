"""Spot safety: a run stopped by SIGTERM resumes from its checkpoint and ends where an
uninterrupted run ends (same weights), a damaged newest checkpoint is passed over, and a full disk
at SIGTERM fails the run with its reason and no partial file."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from train import checkpoint
from train.errors import SettingsError

from imagedata import write_image_folder

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--architecture", "resnet18", "--pretrained", "false", "--image-size", "32",
        "--batch-size", "8", "--epochs", "3", "--checkpoint-steps", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_image_folder(root / "train", 16, seed=1)
    write_image_folder(root / "valid", 4, seed=2)
    return root


def train_command(dataset: Path, base: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "train", "--train", str(dataset), "--base-dir", str(base),
            "--workers", str(workers), *ARGS]


def weights(base: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(base / "model" / "model.safetensors"))


def run_to_end(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_then_restart_ends_with_the_uninterrupted_weights(dataset: Path, tmp_path: Path, workers: int) -> None:
    reference = run_to_end(train_command(dataset, tmp_path / "reference", workers))
    assert reference.returncode == 0, reference.stderr[-3000:]

    base = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(train_command(dataset, base, workers), cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((base / "checkpoints").glob("checkpoint-*.pt")):  # a step checkpoint exists
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "run again to resume" in stderr
    assert not (base / "model" / "model.safetensors").exists()
    stopped_at = checkpoint.load_latest(base / "checkpoints")
    assert stopped_at is not None and stopped_at["global_step"] < 3 * 6  # 48 images / 8 = 6 steps

    resumed = run_to_end(train_command(dataset, base, workers))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    expected, actual = weights(tmp_path / "reference"), weights(base)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, {"epoch": 1, "step_in_epoch": 2, "value": 1}, global_step=2)
    checkpoint.save(tmp_path, {"epoch": 1, "step_in_epoch": 4, "value": 2}, global_step=4)
    newest = max(tmp_path.glob("checkpoint-*.pt"))
    newest.write_bytes(newest.read_bytes()[:100])  # as if the disk filled up mid-write elsewhere
    assert checkpoint.load_latest(tmp_path)["value"] == 1


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    for step in range(1, 6):
        checkpoint.save(tmp_path, {"epoch": 1, "step_in_epoch": step}, global_step=step)
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*.pt"))] == [
        "checkpoint-0000000004.pt", "checkpoint-0000000005.pt"]
    assert not list(tmp_path.glob(".*.tmp"))


class Payload:
    """What a tampered checkpoint could carry: unpickling it would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path: Path, caplog) -> None:
    checkpoint.save(tmp_path, {"epoch": 1, "step_in_epoch": 2, "rng": checkpoint.rng_state()}, global_step=2)
    marker = tmp_path / "marker"
    torch.save({"epoch": 9, "step_in_epoch": 0, "payload": Payload(marker)}, tmp_path / "checkpoint-0000000099.pt")
    state = checkpoint.load_latest(tmp_path)
    assert state is not None and state["epoch"] == 1  # the tampered newest one passed over
    assert not marker.exists()
    assert "ignoring unreadable checkpoint" in caplog.text
    checkpoint.restore_rng_state(state["rng"])  # the RNG state is plain data and tensors


def test_a_full_disk_during_a_checkpoint_fails_loudly_and_leaves_no_partial_file(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    def fill_disk(state, file) -> None:
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fill_disk)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save(tmp_path, {"epoch": 1, "step_in_epoch": 2}, global_step=2)
    assert list(tmp_path.iterdir()) == []


def test_the_os_error_behind_a_failed_write_is_found() -> None:
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0") from None
    except RuntimeError as exc:
        assert exc.__cause__ is None and checkpoint.os_error_behind(exc).errno == 28
    assert checkpoint.os_error_behind(RuntimeError("no file involved")) is None


# The real entry point, with a spot interruption (SIGTERM) arriving right after the first checkpoint.
INTERRUPTED_AFTER_THE_FIRST_CHECKPOINT = """
import signal, sys
from train import checkpoint
from train.__main__ import main

write = checkpoint.save

def write_then_interrupt(*args, **kwargs):
    path = write(*args, **kwargs)
    signal.raise_signal(signal.SIGTERM)
    return path

checkpoint.save = write_then_interrupt
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (writes fail with ENOSPC)")
def test_a_full_disk_at_sigterm_fails_the_run_with_the_reason_and_no_partial_file(dataset: Path,
                                                                                   tmp_path: Path) -> None:
    base, folder = tmp_path / "ml", tmp_path / "ml" / "checkpoints"
    folder.mkdir(parents=True)
    # Step 1's checkpoint is written; step 2's, at SIGTERM, meets a full disk (the kernel's ENOSPC).
    (folder / ".checkpoint-0000000002.pt.tmp").symlink_to("/dev/full")
    command = [sys.executable, "-c", INTERRUPTED_AFTER_THE_FIRST_CHECKPOINT, "--train", str(dataset),
               "--base-dir", str(base), "--workers", "0", "--architecture", "resnet18", "--pretrained", "false",
               "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--checkpoint-steps", "1"]
    result = run_to_end(command)
    assert result.returncode == 1, result.stderr[-3000:]
    reason = (base / "output" / "failure").read_text()
    assert reason.startswith(f"the checkpoint of step 2 on SIGTERM could not be written to "
                             f"{folder}: No space left on device (errno 28)"), reason
    assert "run again to resume" not in result.stderr
    assert sorted(path.name for path in folder.iterdir()) == ["checkpoint-0000000001.pt"]
    assert checkpoint.load_latest(folder)["global_step"] == 1
    assert not (base / "model" / "model.safetensors").exists()


def test_a_checkpoint_travels_between_ranks_as_safe_bytes() -> None:
    state = {"epoch": 3, "model": {"w": torch.ones(2)}, "rng": checkpoint.rng_state(), "history": [{"a": 1.0}]}
    copy = checkpoint.from_bytes(checkpoint.to_bytes(state))
    assert copy["epoch"] == 3 and copy["history"] == [{"a": 1.0}]
    torch.testing.assert_close(copy["model"]["w"], torch.ones(2))
    with pytest.raises(Exception):  # noqa: B017 - whatever torch calls it, a payload is not loaded
        checkpoint.from_bytes(checkpoint.to_bytes({"payload": Payload(Path("/nonexistent/marker"))}))


def _trainee(task: str = "multiclass") -> checkpoint.Trainee:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return checkpoint.Trainee(model, optimizer, scheduler, None, "resnet18", ("a", "b", "c"), task)


def test_a_checkpoint_keeps_the_names_it_has_always_had_and_restores_the_progress() -> None:
    trainee = _trainee()
    progress = checkpoint.Progress(epoch=3, step_in_epoch=5, global_step=25, history=[{"epoch": 1}, {"epoch": 2}],
                                   best_score=0.75, best_epoch=2, best_weights=trainee.model.state_dict(),
                                   stale_epochs=0)
    state = checkpoint.capture(progress, trainee, {"hyperparameters": {"task": "multiclass"}})
    assert set(state) == {"epoch", "step_in_epoch", "global_step", "history", "best_accuracy", "best_epoch",
                          "best_state", "stale_epochs", "architecture", "class_names", "model", "optimizer",
                          "scheduler", "scaler", "rng", "settings"}
    restored = checkpoint.from_bytes(checkpoint.to_bytes(state))  # as a resumed job reads it
    back = checkpoint.restore(restored, _trainee())
    assert dataclasses.replace(back, best_weights=None) == dataclasses.replace(progress, best_weights=None)
    assert back.best_weights is not None and torch.equal(back.best_weights["weight"], trainee.model.weight)


def test_a_checkpoint_of_another_task_is_refused() -> None:
    state = checkpoint.capture(checkpoint.Progress(), _trainee(), {"hyperparameters": {}})  # from before tasks
    with pytest.raises(SettingsError, match="task=multiclass"):
        checkpoint.restore(state, _trainee("multilabel"))
    checkpoint.restore(state, _trainee("multiclass"))
