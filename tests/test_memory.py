"""Free memory as a container sees it: the host's MemAvailable and the cgroup's limit."""

from __future__ import annotations

from pathlib import Path

import torch

from serve.memory import available_bytes

CPU = torch.device("cpu")
GIB = 1 << 30


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_smaller_of_host_and_cgroup_wins(tmp_path: Path) -> None:
    meminfo = write(tmp_path / "meminfo", f"MemTotal: {64 * GIB // 1024} kB\nMemAvailable: {32 * GIB // 1024} kB\n")
    limit, usage = write(tmp_path / "max", str(4 * GIB)), write(tmp_path / "current", str(GIB))
    stat = tmp_path / "no-stat"
    assert available_bytes(CPU, meminfo=meminfo, cgroups=((limit, usage, stat, "inactive_file"),)) == 3 * GIB
    roomy = write(tmp_path / "big", str(100 * GIB))
    assert available_bytes(CPU, meminfo=meminfo, cgroups=((roomy, usage, stat, "inactive_file"),)) == 32 * GIB


def test_reclaimable_file_cache_counts_as_free(tmp_path: Path) -> None:
    """A model file just read sits in the page cache, charged to the cgroup until reclaimed."""
    meminfo = write(tmp_path / "meminfo", f"MemAvailable: {32 * GIB // 1024} kB\n")
    limit, usage = write(tmp_path / "max", str(4 * GIB)), write(tmp_path / "current", str(3 * GIB))
    stat = write(tmp_path / "memory.stat", f"anon {GIB}\nactive_file {GIB // 2}\ninactive_file {GIB}\n")
    assert available_bytes(CPU, meminfo=meminfo, cgroups=((limit, usage, stat, "inactive_file"),)) == 2 * GIB


def test_no_limit_and_missing_files_fall_back_to_the_host(tmp_path: Path) -> None:
    meminfo = write(tmp_path / "meminfo", f"MemAvailable: {GIB // 1024} kB\n")
    unlimited_v2 = write(tmp_path / "max", "max")
    unlimited_v1 = write(tmp_path / "limit", str((1 << 63) - 4096))
    usage = write(tmp_path / "usage", "123")
    missing = tmp_path / "missing"
    cgroups = ((unlimited_v2, usage, missing, "inactive_file"), (unlimited_v1, usage, missing, "total_inactive_file"),
               (missing, missing, missing, "inactive_file"))
    assert available_bytes(CPU, meminfo=meminfo, cgroups=cgroups) == GIB
    assert available_bytes(CPU, meminfo=missing, cgroups=((missing, missing, missing, "inactive_file"),)) is None


def test_this_machine_reports_something() -> None:
    free = available_bytes(CPU)
    assert free is not None and free > 0
