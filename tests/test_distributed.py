"""Data parallelism on CPU with gloo: the same weights as one process on the combined batches,
and a multi-process run of the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from classifier import artifact
from train.__main__ import main
from train.data import SeededDataset, ShardSampler
from train.distributed import Topology, init_process_group
from train.engine import train_one_epoch

from imagedata import write_image_folder
from ports import free_port

STEPS, PER_PROCESS_BATCH, WORLD = 6, 4, 2
TOLERANCE = 1e-5  # float32 sums in another order; observed differences are ~1e-7



def small_net() -> nn.Module:
    torch.manual_seed(0)  # identical initial weights everywhere (DDP also broadcasts rank 0's)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))


def fixed_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    count = STEPS * PER_PROCESS_BATCH * WORLD
    return TensorDataset(torch.randn(count, 3, 12, 12, generator=generator),
                         torch.randint(0, 3, (count,), generator=generator))


def train_steps(model: nn.Module, rank: int, world_size: int, batch_size: int) -> dict[str, torch.Tensor]:
    data = fixed_data()
    sampler = ShardSampler(len(data), rank=rank, world_size=world_size, shuffle=True, seed=3)
    loader = DataLoader(SeededDataset(data), batch_size=batch_size, sampler=sampler)
    trained = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_one_epoch(trained, loader, nn.CrossEntropyLoss(), optimizer, scheduler, torch.device("cpu"), 1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(local_rank: int, port: int, out: str) -> None:
    topology = Topology(("localhost",), "localhost", WORLD, "127.0.0.1", port, None)
    init_process_group(topology, local_rank, use_cuda=False, timeout_s=60)
    state = train_steps(small_net(), dist.get_rank(), WORLD, PER_PROCESS_BATCH)
    if dist.get_rank() == 0:
        torch.save(state, out)
    dist.destroy_process_group()


def test_two_gloo_processes_match_one_process_on_the_combined_batches(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    mp.start_processes(_ddp_worker, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    distributed = torch.load(out, weights_only=True)
    single = train_steps(small_net(), 0, 1, PER_PROCESS_BATCH * WORLD)
    initial = small_net().state_dict()
    for name in single:
        assert not torch.equal(single[name], initial[name]), f"{name} did not train"
        torch.testing.assert_close(distributed[name], single[name], rtol=0, atol=TOLERANCE, msg=name)


def test_shards_cover_the_epoch_once_and_differ_between_epochs() -> None:
    def indices(rank: int, epoch: int) -> list[int]:
        sampler = ShardSampler(10, rank=rank, world_size=2, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        return [index for index, _ in sampler]

    assert sorted(indices(0, 1) + indices(1, 1)) == list(range(10))
    assert indices(0, 1) != indices(0, 2)
    resumed = ShardSampler(10, rank=0, world_size=2, shuffle=True, seed=0)
    resumed.set_epoch(1, start=2)
    assert [index for index, _ in resumed] == indices(0, 1)[2:]


def test_entry_point_with_two_processes_per_host_writes_one_artifact(tmp_path: Path, capfd) -> None:
    write_image_folder(tmp_path / "data" / "train", 12, seed=1)
    write_image_folder(tmp_path / "data" / "valid", 4, seed=2)
    argv = ["--train", str(tmp_path / "data"), "--base-dir", str(tmp_path / "ml"), "--architecture", "resnet18",
            "--pretrained", "false", "--image-size", "32", "--batch-size", "4", "--epochs", "2",
            "--workers", "0", "--processes-per-host", "2"]
    assert main(argv, {"MASTER_PORT": str(free_port())}) == 0
    assert artifact.load_manifest(tmp_path / "ml" / "model").class_names == ("circle", "square", "triangle")
    metrics = json.loads((tmp_path / "ml" / "output" / "data" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    logs = capfd.readouterr().err
    assert "rank 0 of 2" in logs and "rank 1 of 2" in logs
    assert logs.count("artifact written") == 1
