"""Data parallelism on CPU with gloo: the same weights as one process on the combined batches,
a rendezvous store that listens on one address only, tensors (not pickles) between ranks, a full
disk that stops every rank, and a multi-process run of the real entry point."""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from classifier import artifact
from train import checkpoint
from train.__main__ import main
from train.data import SeededDataset, ShardSampler
from train.distributed import (
    Topology,
    all_gather_pairs,
    all_gather_rows,
    init_process_group,
    interface_address,
    store_address,
)
from train.engine import train_one_epoch
from train.errors import PeerError

from imagedata import write_image_folder
from ports import free_port

STEPS, PER_PROCESS_BATCH, WORLD = 6, 4, 2
TOLERANCE = 1e-5  # float32 sums in another order; observed differences are ~1e-7


def two_process_topology(port: int) -> Topology:
    return Topology(("localhost",), "localhost", WORLD, "127.0.0.1", port, None)


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
    init_process_group(two_process_topology(port), local_rank, use_cuda=False, timeout_s=60)
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
    write_image_folder(tmp_path / "data" / "test", 3, seed=3)  # 9 images: shards of 5 and 4
    argv = ["--train", str(tmp_path / "data"), "--base-dir", str(tmp_path / "ml"), "--architecture", "resnet18",
            "--pretrained", "false", "--image-size", "32", "--batch-size", "4", "--epochs", "2",
            "--workers", "0", "--processes-per-host", "2"]
    assert main(argv, {"MASTER_PORT": str(free_port())}) == 0
    assert artifact.load_manifest(tmp_path / "ml" / "model").class_names == ("circle", "square", "triangle")
    metrics = json.loads((tmp_path / "ml" / "output" / "data" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    report = json.loads((tmp_path / "ml" / "output" / "data" / "classification_report.json").read_text())
    assert report["num_samples"] == 9  # both ranks' test predictions, gathered
    logs = capfd.readouterr().err
    assert "rank 0 of 2" in logs and "rank 1 of 2" in logs
    assert logs.count("artifact written") == 1


def listeners(port: int) -> list[str]:
    """The local addresses of the sockets listening on TCP ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if int(local_port, 16) == port and state == "0A":  # 0A: LISTEN
                words = bytes.fromhex(address)
                packed = b"".join(words[i:i + 4][::-1] for i in range(0, len(words), 4))  # host byte order
                found.append(socket.inet_ntop(family, packed))
    return found


def other_local_addresses() -> list[str]:
    """Addresses of this machine other than 127.0.0.1 (all of 127/8 reaches this host on Linux)."""
    own = [interface_address(name) for _, name in socket.if_nameindex()]
    return ["127.0.0.2"] + [a for a in own if a and not ipaddress.ip_address(a).is_loopback]


def accepts(address: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex((address, port)) == 0


def _store_worker(local_rank: int, port: int, out: str) -> None:
    init_process_group(two_process_topology(port), local_rank, use_cuda=False, timeout_s=60)
    if dist.get_rank() == 0:
        seen = {"listeners": listeners(port), "127.0.0.1": accepts("127.0.0.1", port),
                "elsewhere": {address: accepts(address, port) for address in other_local_addresses()}}
        Path(out).write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


def test_the_rendezvous_store_listens_on_the_job_address_only(tmp_path: Path) -> None:
    out, port = tmp_path / "seen.json", free_port()
    mp.start_processes(_store_worker, args=(port, str(out)), nprocs=WORLD, start_method="spawn")
    seen = json.loads(out.read_text())
    assert seen["listeners"] == ["127.0.0.1"]  # not 0.0.0.0 or ::
    assert seen["127.0.0.1"] is True
    assert seen["elsewhere"] and not any(seen["elsewhere"].values()), seen["elsewhere"]


def test_the_store_follows_master_addr_and_the_interface_when_that_is_loopback() -> None:
    assert store_address(Topology(("localhost",), "localhost", 2, "127.0.0.1", 29500, None)) == (
        socket.AF_INET, ("127.0.0.1", 29500))
    interfaces = [(name, address) for _, name in socket.if_nameindex()
                  if (address := interface_address(name)) and not ipaddress.ip_address(address).is_loopback]
    if not interfaces:
        pytest.skip("this machine has no network interface with an IPv4 address besides loopback")
    name, address = interfaces[0]
    # A hosts file that maps this host's name to 127.0.0.1, in a job of two hosts: peers cannot
    # dial loopback, so the store listens on the job's interface.
    topology = Topology(("algo-1", "algo-2"), "algo-1", 1, "127.0.0.1", 29500, name)
    assert store_address(topology) == (socket.AF_INET, (address, 29500))


def test_a_missing_peer_is_a_clear_error_and_frees_the_port() -> None:
    port = free_port()
    with pytest.raises(PeerError, match="rank 0: could not form the process group of 2"):
        init_process_group(two_process_topology(port), 0, use_cuda=False, timeout_s=1)
    with socket.socket() as again:  # the store closed its listening socket
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


def _gather_worker(local_rank: int, port: int, out: str) -> None:
    init_process_group(two_process_topology(port), local_rank, use_cuda=False, timeout_s=60)
    rank, cpu = dist.get_rank(), torch.device("cpu")
    uneven = [(rank, 10 + i) for i in range(3)] if rank == 0 else []
    reversed_ = [] if rank == 0 else [(7, 8), (9, 2**40)]
    gathered = [all_gather_pairs(uneven, cpu), all_gather_pairs(reversed_, cpu), all_gather_pairs([], cpu)]
    # Multi-label evaluation gathers float64 rows (probabilities and targets); rank 0's shard is empty.
    rows = torch.tensor([[0.25, 1.0], [1 / 3, 0.0]], dtype=torch.float64) if rank == 1 else torch.zeros((0, 2))
    gathered.append(all_gather_rows(rows.double(), cpu).tolist())
    Path(out, f"rank{rank}.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


def test_pairs_are_gathered_as_tensors_in_rank_order(tmp_path: Path) -> None:
    mp.start_processes(_gather_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    expected = [[[0, 10], [0, 11], [0, 12]], [[7, 8], [9, 2**40]], [], [[0.25, 1.0], [1 / 3, 0.0]]]
    for rank in range(WORLD):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected, rank


def _full_disk_worker(local_rank: int, port: int, directory: str) -> None:
    init_process_group(two_process_topology(port), local_rank, use_cuda=False, timeout_s=60)
    rank = dist.get_rank()
    try:
        checkpoint.save_on_main(Path(directory), lambda: {"epoch": 1, "step_in_epoch": 3, "w": torch.ones(4096)},
                                3, rank, torch.device("cpu"), stopping=True)
        outcome = "saved"
    except checkpoint.CheckpointError as exc:
        outcome = str(exc)
    Path(directory).parent.joinpath(f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (writes fail with ENOSPC)")
def test_a_full_disk_on_rank_0_stops_every_rank_with_the_reason(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / ".checkpoint-0000000003.pt.tmp").symlink_to("/dev/full")  # where rank 0 writes
    mp.start_processes(_full_disk_worker, args=(free_port(), str(directory)), nprocs=WORLD, start_method="spawn")
    for rank in range(WORLD):
        reason = (tmp_path / f"rank{rank}.txt").read_text()
        assert reason.startswith(f"the checkpoint of step 3 on SIGTERM could not be written to {directory}: "
                                 "No space left on device (errno 28); free space there"), (rank, reason)
    assert list(directory.iterdir()) == []
