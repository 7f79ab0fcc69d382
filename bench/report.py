"""Where a benchmark's results go: ``bench/results/<name>.json`` and ``.md``, with the machine
and the tree they were measured on. What a person writes about a run goes into
``bench/results/<name>-notes.md``, which a new run leaves alone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """The machine, and its load as the run ends (the load other work put beside the run)."""
    return f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at the end"


def commit() -> str:
    """The commit of the tree measured, ``-dirty`` when it had changes (``unknown`` outside git)."""
    result = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=RESULTS.parent,
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


def save(name: str, data: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
