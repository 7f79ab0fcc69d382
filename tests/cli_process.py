"""The deploy CLI as a user runs it, in a process of its own (any Python: the suite's, or the
SDK v3 environment's)."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_argv(image: str, data: Path, output: Path, root: Path, hyperparameters: dict[str, str],
               *channels: str) -> list[str]:
    argv = ["train", "--local", "--image-uri", image, "--container-root", str(root),
            "--data", f"file://{data / 'train'}", "--output-path", f"file://{output}"]
    for channel, folder in (("--validation", "valid"), ("--test", "test")):
        if folder in channels:
            argv += [channel, f"file://{data / folder}"]
    for key, value in hyperparameters.items():
        argv += ["--hp", f"{key}={value}"]
    return argv


class Background:
    """A CLI process whose output is collected line by line, for waiting on a line with a deadline."""

    def __init__(self, argv: list[str], env: dict[str, str], python: str = sys.executable) -> None:
        self.process = subprocess.Popen([python, "-m", "deploy", *argv], cwd=REPO, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"the CLI exited ({self.process.wait()}) before {text!r}:\n{self.output}")
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} within {timeout_s} s:\n{self.output}")

    def finish(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        while (line := self._queue.get(timeout=timeout_s)) is not None:
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)[-6000:]
