"""Where a model's own code is, and installing its requirements. Light on purpose: the server's
entry point installs ``requirements.txt`` before it imports torch or anything the code may pin, as
SageMaker's PyTorch container does before its model server starts."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)
DEFAULT_PROGRAM = "inference.py"


def code_folder(model_dir: Path, program: str | None, submit_directory: str | None) -> Path:
    """Where the handlers live: ``<model>/code`` as PyTorchModel packs it, else the submit directory."""
    packed = model_dir / "code"
    submitted = (submit_directory or "").removeprefix("file://")
    if not (packed / (program or DEFAULT_PROGRAM)).is_file() and submitted and Path(submitted).is_dir():
        return Path(submitted)
    return packed


def has_handlers(model_dir: Path, program: str | None, submit_directory: str | None = None) -> bool:
    """Whether ``model_dir`` is served through user code: SAGEMAKER_PROGRAM is set, or it holds code/inference.py."""
    return bool(program) or (code_folder(model_dir, program, submit_directory) / DEFAULT_PROGRAM).is_file()


def install_requirements(code: Path) -> None:
    """``pip install -r code/requirements.txt`` when there is one, as the framework container does at start."""
    requirements = code / "requirements.txt"
    if not requirements.is_file():
        return
    logger.info("installing %s", requirements)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-input", "-r", str(requirements)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = [line for line in result.stderr.splitlines() if line.strip()][-3:]
        raise RuntimeError(f"pip could not install code/requirements.txt (exit {result.returncode}): "
                           f"{' | '.join(last)}; is the package index reachable from the container?")
