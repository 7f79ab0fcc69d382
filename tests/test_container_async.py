"""The real CPU image behind an asynchronous endpoint (``CLASSIFIER_ASYNC=true``): a 50 MB image,
far above the real-time 6 MB limit, is streamed to disk as it arrives and classified, and the
server's peak memory shows it was never held in memory. The same request to a server told to keep
bodies in memory shows the measurement sees a body that is held."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from containers import docker, image_for, serving

pytestmark = pytest.mark.container
SIDE = 5200  # 27 megapixels, under the 40-megapixel limit for one image
MEGABYTE = 1024 * 1024


@pytest.fixture(scope="module")
def small_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("async") / "small.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (650, 650, 3), dtype=np.uint8)).save(path, "JPEG")
    return path


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Noise barely compresses: a JPEG of over 50 MB, decoded at a reduced scale (1/8)."""
    pixels = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, "JPEG", quality=100)
    path = tmp_path_factory.mktemp("async") / "large.jpg"
    path.write_bytes(encoded.getvalue())
    assert path.stat().st_size > 50 * MEGABYTE
    return path


def memory_kb(container: str) -> dict[str, int]:
    """The server process's resident memory and its peak since the last reset, in kB."""
    status = docker("exec", container, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(MEGABYTE):
            yield chunk


def peak_growth_mb(container: str, url: str, path: Path) -> float:
    """Classify ``path`` (sent as it is read, as SageMaker's agent streams an S3 input) and return
    how far the server's peak resident memory rose above its resident memory before."""
    docker("exec", container, "sh", "-c", "echo 5 > /proc/1/clear_refs")  # reset the peak to the current size
    before = memory_kb(container)["VmRSS"]
    response = httpx.post(f"{url}/invocations", content=file_chunks(path), timeout=300,
                          headers={"Content-Type": "image/jpeg", "Content-Length": str(path.stat().st_size)})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 5
    return (memory_kb(container)["VmHWM"] - before) / 1024


def test_a_50_mb_image_is_classified_without_being_held_in_memory(small_jpeg: Path, large_jpeg: Path) -> None:
    """Each server answers a small image first: a first request's own allocations (about 9 MB,
    whatever its size) are not the body's."""
    body_mb = large_jpeg.stat().st_size / MEGABYTE
    with serving(image_for("cpu"), "-e", "CLASSIFIER_ASYNC=true") as served:
        peak_growth_mb(served.container, served.url, small_jpeg)
        streamed = peak_growth_mb(served.container, served.url, large_jpeg)
        still = docker("inspect", "-f", "{{.State.Running}}", served.container).stdout.strip()
        assert still == "true"
        # The body's file was closed once decoded: the server holds no deleted file open.
        open_files = docker("exec", served.container, "sh", "-c", "ls -l /proc/1/fd").stdout
        assert "(deleted)" not in open_files, open_files
    with serving(image_for("cpu"), "-e", "CLASSIFIER_ASYNC=true", "-e", "CLASSIFIER_SPOOL_BODY_MB=1024") as served:
        peak_growth_mb(served.container, served.url, small_jpeg)
        held = peak_growth_mb(served.container, served.url, large_jpeg)
    print(f"peak memory growth for a {body_mb:.0f} MB body: streamed {streamed:.1f} MB, held {held:.1f} MB")
    assert held > body_mb  # the measurement sees a body held in memory
    # At most 8 MB of the body (CLASSIFIER_SPOOL_BODY_MB), plus what a thread's first large
    # decode allocates (up to about 7 MB, whatever the body's size): far from even half of it.
    assert streamed < body_mb / 2


def test_a_real_time_server_refuses_the_same_body_with_413_before_reading_it(large_jpeg: Path) -> None:
    with serving(image_for("cpu")) as served:
        response = httpx.post(f"{served.url}/invocations", content=file_chunks(large_jpeg), timeout=60,
                              headers={"Content-Type": "image/jpeg", "Content-Length": str(large_jpeg.stat().st_size)})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        assert "the limit is 6291456 bytes" in response.json()["error"]["message"]
        assert httpx.get(f"{served.url}/ping", timeout=5).status_code == 200
