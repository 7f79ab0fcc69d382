"""Loader workers and shared memory: batches reach training whatever ``/dev/shm`` holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from train import data
from train.data import ArrayBatches, Transport, make_loader, shared_memory_free
from train.settings import Hyperparameters

MB = 1024 * 1024
BATCH_224 = 64 * 3 * 224 * 224 * 4  # the default batch of default-sized images


def test_default_batches_do_not_fit_dockers_default_shared_memory() -> None:
    transport = Transport.choose(workers=2, batch_bytes=BATCH_224, shared_free=64 * MB)
    assert transport.through_pipes and transport.workers == 2
    assert "through pipes" in transport.describe(BATCH_224, 64 * MB)
    assert "--shm-size" in transport.describe(BATCH_224, 64 * MB)


def test_shared_memory_is_used_when_it_has_room() -> None:
    assert not Transport.choose(workers=2, batch_bytes=BATCH_224, shared_free=2048 * MB).through_pipes
    assert not Transport.choose(workers=2, batch_bytes=64 * 3 * 32 * 32 * 4, shared_free=64 * MB).through_pipes


def test_no_workers_and_unknown_shared_memory_need_no_pipes() -> None:
    assert not Transport.choose(workers=0, batch_bytes=BATCH_224, shared_free=0).through_pipes
    assert not Transport.choose(workers=4, batch_bytes=BATCH_224, shared_free=None).through_pipes


def test_free_space_is_measured_and_a_missing_folder_is_unknown(tmp_path: Path) -> None:
    assert shared_memory_free(tmp_path) > 0
    assert shared_memory_free(tmp_path / "absent") is None


def hyperparameters(**values: object) -> Hyperparameters:
    return dataclasses.replace(Hyperparameters(), **values)


def test_workers_send_batches_through_pipes_with_no_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no room in /dev/shm the batches still arrive, equal to the ones shared memory gives."""
    images = torch.arange(40 * 3 * 16 * 16, dtype=torch.float32).reshape(40, 3, 16, 16)
    dataset = TensorDataset(images, torch.arange(40))
    hp = hyperparameters(workers=2, batch_size=16, image_size=16)

    monkeypatch.setattr(data, "shared_memory_free", lambda folder=data.SHARED_MEMORY: 0)
    piped = make_loader(dataset, hp, pin_memory=False, shuffle=False)
    assert isinstance(piped, ArrayBatches) and len(piped) == 3
    monkeypatch.setattr(data, "shared_memory_free", lambda folder=data.SHARED_MEMORY: 1 << 40)
    shared = make_loader(dataset, hp, pin_memory=False, shuffle=False)
    assert not isinstance(shared, ArrayBatches)

    for (piped_images, piped_targets), (shared_images, shared_targets) in zip(piped, shared, strict=True):
        assert piped_images.dtype == torch.float32 and piped_targets.dtype == torch.int64
        torch.testing.assert_close(piped_images, shared_images, rtol=0, atol=0)
        torch.testing.assert_close(piped_targets, shared_targets, rtol=0, atol=0)
