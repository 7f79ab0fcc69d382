"""How much memory is free, measured where the limit really is: the container's cgroup or the host.

A container on SageMaker sees the host's ``/proc/meminfo`` but may be held to less by its cgroup,
so free memory is the smaller of the two: ``MemAvailable``, and the cgroup's limit minus its
usage (cgroup v2 ``memory.max``/``memory.current`` or v1 ``memory.limit_in_bytes``/``usage``),
where usage leaves out inactive file cache, which the kernel reclaims before it would run out
(as ``docker stats`` counts it). On a GPU it is the device's free memory plus what PyTorch's
allocator holds cached but unused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# (limit, usage, statistics, the reclaimable cache's name in the statistics)
CGROUP_V2 = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current"),
             Path("/sys/fs/cgroup/memory.stat"), "inactive_file")
CGROUP_V1 = (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
             Path("/sys/fs/cgroup/memory/memory.stat"), "total_inactive_file")
Cgroup = tuple[Path, Path, Path, str]
# cgroup v1 reports "no limit" as a huge number near 2**63.
NO_LIMIT = 1 << 60


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2's no limit) is not a number


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _statistic(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_available(cgroup: Cgroup) -> int | None:
    limit_file, usage_file, stat_file, reclaimable = cgroup
    limit, usage = _read_int(limit_file), _read_int(usage_file)
    if limit is None or usage is None or limit >= NO_LIMIT:
        return None
    return max(0, limit - max(0, usage - _statistic(stat_file, reclaimable)))


def available_bytes(device: torch.device, *, meminfo: Path = Path("/proc/meminfo"),
                    cgroups: tuple[Cgroup, ...] = (CGROUP_V2, CGROUP_V1)) -> int | None:
    """Bytes that can still be allocated on ``device``; None when nothing can be measured."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    measured = [_meminfo_available(meminfo), *(_cgroup_available(cgroup) for cgroup in cgroups)]
    known = [value for value in measured if value is not None]
    return min(known) if known else None


def model_bytes(model: nn.Module) -> int:
    """Memory held by a model's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            total += tensor.untyped_storage().nbytes()
    return total
