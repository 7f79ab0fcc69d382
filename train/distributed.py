"""Data-parallel topology: which process this is, and how the processes find each other.

On SageMaker the hosts come from ``resourceconfig.json`` (``algo-1`` .. ``algo-N``, sorted); the
first host is the rendezvous point. Each host runs one process per visible GPU (one on CPU).
Ranks are ``host_index * processes_per_host + local_rank``; gloo on CPU, NCCL on GPU.

Rank 0 holds the rendezvous store (a ``TCPStore``) on a socket bound to the one address its peers
dial, not to every interface of the host. Results travel between processes as tensors, never as
pickles.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from train.errors import PeerError, SettingsError

logger = logging.getLogger(__name__)
DEFAULT_MASTER_PORT = 29500
SIOCGIFADDR = 0x8915  # Linux ioctl: the IPv4 address of a network interface


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
                raise PeerError(f"host {name!r} did not resolve within {timeout_s:.0f} s") from None
            time.sleep(1)


def interface_exists(name: str | None) -> bool:
    """Whether this host has the network interface ``name``: resourceconfig.json may name one that
    does not exist (SDK v3 local mode says "ethwe"), and gloo or NCCL pinned to it would fail."""
    return bool(name) and name in {interface for _, interface in socket.if_nameindex()}


def interface_address(name: str) -> str | None:
    """The IPv4 address of the network interface ``name``, or None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            reply = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(reply[20:24])


def store_address(topology: Topology) -> tuple[socket.AddressFamily, tuple]:
    """Where rank 0's store listens (family and socket address): ``master_addr`` as this host
    resolves it, which is what the peers dial. A hosts file may map this host's own name to a
    loopback address that peers on other hosts cannot dial; the job's interface is used then."""
    try:
        family, _, _, _, address = socket.getaddrinfo(topology.master_addr, topology.master_port,
                                                      type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise PeerError(f"MASTER_ADDR {topology.master_addr!r} does not resolve: {exc.strerror}") from None
    if len(topology.hosts) > 1 and ipaddress.ip_address(address[0]).is_loopback and interface_exists(topology.interface):
        own = interface_address(topology.interface)
        if own is not None:
            return socket.AF_INET, (own, topology.master_port)
    return family, address


def _listen(topology: Topology) -> tuple[str, socket.socket]:
    family, address = store_address(topology)
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted job reuses the port
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)
    except OSError as exc:
        listener.close()
        raise PeerError(f"rank 0 cannot listen on {address[0]} port {topology.master_port} "
                            f"(MASTER_ADDR {topology.master_addr!r}): {exc.strerror}") from None
    return address[0], listener


def _rendezvous_store(topology: Topology, rank: int, timeout: datetime.timedelta) -> dist.Store:
    """Rank 0 serves the store on a socket of its own, bound to one address (torch's own store
    would listen on every interface); the other ranks connect to it."""
    if rank != 0:
        # The address rank 0 listens on, as this host resolves it: on rank 0's own host, where its
        # name may map to loopback, that is the job's interface too.
        return dist.TCPStore(store_address(topology)[1][0], topology.master_port, topology.world_size,
                             is_master=False, timeout=timeout)
    address, listener = _listen(topology)
    logger.info("rendezvous store listening on %s port %d only", address, topology.master_port)
    # The store owns the socket from here on: it closes it when it ends, or when it fails to start.
    return dist.TCPStore(address, topology.master_port, topology.world_size, is_master=True,
                         timeout=timeout, master_listen_fd=listener.detach())


def init_process_group(topology: Topology, local_rank: int, *, use_cuda: bool, timeout_s: float) -> None:
    """Join the job's process group; fails on every host if a peer never shows up in time."""
    if interface_exists(topology.interface):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", topology.interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", topology.interface)
    wait_for_host(topology.master_addr, timeout_s)
    rank = topology.rank(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    logger.info("joining process group as rank %d of %d via %s:%d",
                rank, topology.world_size, topology.master_addr, topology.master_port)
    try:
        store = _rendezvous_store(topology, rank, timeout)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store, rank=rank,
                                world_size=topology.world_size, timeout=timeout)
    except (RuntimeError, dist.DistStoreError) as exc:
        raise PeerError(
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


def from_main_process(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every process (``value`` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def all_gather_rows(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every process's ``rows`` (a 2-D tensor), in rank order, on every process, on the CPU
    (``rows`` itself when not distributed). Counts differ between processes: each shard is padded
    to the longest."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows.cpu()
    world_size = dist.get_world_size()
    count = torch.tensor([len(rows)], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    if max(sizes) == 0:
        return rows.cpu()
    shard = torch.zeros((max(sizes), rows.shape[1]), dtype=rows.dtype, device=device)
    shard[: len(rows)] = rows.to(device)
    shards = [torch.empty_like(shard) for _ in range(world_size)]
    dist.all_gather(shards, shard)
    return torch.cat([gathered[:size] for gathered, size in zip(shards, sizes)]).cpu()


def all_gather_pairs(pairs: list[tuple[int, int]], device: torch.device) -> list[tuple[int, int]]:
    """Every process's ``pairs`` of ints, in rank order, on every process."""
    rows = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    return [(target, predicted) for target, predicted in all_gather_rows(rows, device).tolist()]


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any of them."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
