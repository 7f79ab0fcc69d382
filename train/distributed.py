"""Data-parallel topology: which process this is, and how the processes find each other.

On SageMaker the hosts come from ``resourceconfig.json`` (``algo-1`` .. ``algo-N``, sorted); the
first host is the rendezvous point. Each host runs one process per visible GPU (one on CPU).
Ranks are ``host_index * processes_per_host + local_rank``; gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from train.settings import SettingsError

logger = logging.getLogger(__name__)
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Topology:
    hosts: tuple[str, ...]
    current_host: str
    processes_per_host: int
    master_addr: str
    master_port: int
    interface: str | None

    @property
    def host_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.processes_per_host

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rank(self, local_rank: int) -> int:
        return self.host_rank * self.processes_per_host + local_rank


def discover(base_dir: Path, environ: Mapping[str, str], *, use_cuda: bool, processes_per_host: int) -> Topology:
    """Hosts from SM_HOSTS / SM_CURRENT_HOST when set, else resourceconfig.json, else this host."""
    config_path = base_dir / "input" / "config" / "resourceconfig.json"
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{config_path} is not valid JSON: {exc}") from None
    try:
        hosts = tuple(json.loads(environ["SM_HOSTS"])) if "SM_HOSTS" in environ else tuple(config.get("hosts", ()))
    except json.JSONDecodeError:
        raise SettingsError(f"environment: SM_HOSTS={environ['SM_HOSTS']!r} is not a JSON list") from None
    current = environ.get("SM_CURRENT_HOST") or config.get("current_host") or (hosts[0] if hosts else "localhost")
    hosts = hosts or (current,)
    if current not in hosts:
        raise SettingsError(f"current host {current!r} is not among the hosts {list(hosts)}")
    if processes_per_host <= 0:
        processes_per_host = max(1, torch.cuda.device_count()) if use_cuda else 1
    port = environ.get("MASTER_PORT") or DEFAULT_MASTER_PORT
    return Topology(
        hosts=tuple(sorted(hosts)),
        current_host=current,
        processes_per_host=processes_per_host,
        master_addr=environ.get("MASTER_ADDR") or min(hosts),
        master_port=int(port),
        interface=environ.get("SM_NETWORK_INTERFACE_NAME") or config.get("network_interface_name"),
    )


def wait_for_host(name: str, timeout_s: float) -> None:
    """Host names of peers may resolve only some seconds after the container starts."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(name, None)
            return
        except socket.gaierror:
            if time.monotonic() > deadline:
                raise SettingsError(f"host {name!r} did not resolve within {timeout_s:.0f} s") from None
            time.sleep(1)


def interface_exists(name: str | None) -> bool:
    """Whether this host has the network interface ``name``: resourceconfig.json may name one that
    does not exist (SDK v3 local mode says "ethwe"), and gloo or NCCL pinned to it would fail."""
    return bool(name) and name in {interface for _, interface in socket.if_nameindex()}


def init_process_group(topology: Topology, local_rank: int, *, use_cuda: bool, timeout_s: float) -> None:
    """Join the job's process group; fails on every host if a peer never shows up in time."""
    if interface_exists(topology.interface):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", topology.interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", topology.interface)
    wait_for_host(topology.master_addr, timeout_s)
    rank = topology.rank(local_rank)
    logger.info("joining process group as rank %d of %d via %s:%d",
                rank, topology.world_size, topology.master_addr, topology.master_port)
    try:
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{topology.master_addr}:{topology.master_port}",
            rank=rank,
            world_size=topology.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, dist.DistStoreError) as exc:
        raise SettingsError(
            f"rank {rank}: could not form the process group of {topology.world_size} with "
            f"{topology.master_addr}:{topology.master_port} within {timeout_s:.0f} s: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all processes (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any of them."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
