"""Where a model's own code is, and installing its requirements. Light on purpose: the server's
entry point installs ``requirements.txt`` before it imports torch or anything the code may pin, as
SageMaker's PyTorch container does before its model server starts."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from classifier import packages

logger = logging.getLogger(__name__)
DEFAULT_PROGRAM = "inference.py"


def code_folder(model_dir: Path, program: str | None, submit_directory: str | None) -> Path:
    """Where the handlers live: the first that holds the handler module of ``<model>/code`` (as
    PyTorchModel and SDK v3's TorchServe path pack it), the submit directory, and the model folder
    itself (SDK v3's MMS path mounts the code there); else ``<model>/code``."""
    module = program or DEFAULT_PROGRAM
    packed = model_dir / "code"
    submitted = (submit_directory or "").removeprefix("file://")
    if (packed / module).is_file():
        return packed
    if submitted and (Path(submitted) / module).is_file():
        return Path(submitted)
    if (model_dir / module).is_file() and not (model_dir / "manifest.json").is_file():
        return model_dir  # never for an artifact that happens to hold a stray inference.py
    return packed


def has_handlers(model_dir: Path, program: str | None, submit_directory: str | None = None) -> bool:
    """Whether ``model_dir`` is served through user code: SAGEMAKER_PROGRAM is set, or it holds code/inference.py."""
    return bool(program) or (code_folder(model_dir, program, submit_directory) / DEFAULT_PROGRAM).is_file()


def has_own_code(model_dir: Path, program: str | None) -> bool:
    """Whether ``model_dir`` itself holds the handler module (``code/inference.py``, or ``code/<SAGEMAKER_PROGRAM>``):
    how a multi-model endpoint's model says it is served through its own code."""
    return (model_dir / "code" / (program or DEFAULT_PROGRAM)).is_file()


def install_requirements(code: Path) -> None:
    """``pip install -r code/requirements.txt`` when there is one, as the framework container does at start:
    into the image's environment, or, when that is read-only, into an overlay put on ``sys.path`` (see
    :mod:`classifier.packages`)."""
    requirements = code / "requirements.txt"
    if not requirements.is_file():
        return
    overlay = packages.install_target()
    logger.info("installing %s%s", requirements,
                f" into {overlay.site_packages} (the image's packages are read-only)" if overlay else "")
    result = subprocess.run(packages.pip_install(["-r", str(requirements)], overlay),
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = [line for line in result.stderr.splitlines() if line.strip()][-3:]
        raise RuntimeError(f"pip could not install code/requirements.txt (exit {result.returncode}): "
                           f"{' | '.join(last)}; is the package index reachable from the container?")
    if overlay is not None:
        unloadable = packages.noexec_reason(overlay)
        if unloadable:  # left off sys.path: the server itself would fail to import them
            raise RuntimeError(f"code/requirements.txt: {unloadable}")
        packages.activate(overlay)
