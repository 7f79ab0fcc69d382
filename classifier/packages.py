"""Where pip installs the requirements of a user's own code (a handler-mode model, a script-mode job).

As root, as SageMaker runs the image: into the image's own environment, as SageMaker's framework
containers do. As an unprivileged user or on a read-only root filesystem (``docker run --user
1000:1000 --read-only --tmpfs /tmp``, docker compose) that environment cannot change; then pip
installs into an *overlay*: a virtual environment under the temporary folder whose ``.pth`` file
puts the image's packages on its path. pip there installs only what the image lacks or what the
requirements pin differently, and never touches the image's own copies (they lie outside its
environment); the overlay's packages then come before the image's.
"""

from __future__ import annotations

import importlib
import os
import site
import sys
import sysconfig
import tempfile
import venv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

OVERLAY_FOLDER = "classifier-packages"
IMAGE_PTH = "_image-packages.pth"


@dataclass(frozen=True)
class Overlay:
    """A virtual environment on top of this interpreter's packages."""

    root: Path

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin_dir / "python"

    @property
    def site_packages(self) -> Path:
        root = str(self.root)
        return Path(sysconfig.get_path("purelib", "venv", vars={"base": root, "platbase": root}))


def image_site_packages() -> list[str]:
    """This interpreter's own site-packages folders."""
    return list(dict.fromkeys(sysconfig.get_path(name) for name in ("purelib", "platlib")))


def image_is_writable() -> bool:
    return all(os.access(path, os.W_OK) for path in image_site_packages())


def create_overlay(root: Path, image_paths: Sequence[str] | None = None) -> Overlay:
    """The overlay at ``root`` (made on first use) seeing ``image_paths`` (default: this interpreter's packages)."""
    overlay = Overlay(root)
    if not overlay.python.exists():
        venv.EnvBuilder(symlinks=True, with_pip=False).create(root)  # pip comes from the image's packages
    paths = image_site_packages() if image_paths is None else image_paths
    (overlay.site_packages / IMAGE_PTH).write_text("".join(f"{path}\n" for path in paths))
    return overlay


def install_target(temp_dir: Path | None = None) -> Overlay | None:
    """None when pip can install into this environment, else the overlay under ``temp_dir`` (default: the
    temporary folder); a RuntimeError says why neither is possible."""
    if image_is_writable():
        return None
    try:
        return create_overlay(Path(temp_dir or tempfile.gettempdir()) / OVERLAY_FOLDER)
    except OSError as exc:
        raise RuntimeError(f"the image's packages are read-only (an unprivileged user or a read-only root "
                           f"filesystem) and no overlay can be made in the temporary folder ({exc}); give the "
                           "container a writable temporary folder (docker run --tmpfs /tmp:exec)") from None


def pip_install(args: Sequence[str], overlay: Overlay | None) -> list[str]:
    """The pip command that installs ``args`` into ``overlay``, or into this environment for None."""
    if overlay is None:
        return [sys.executable, "-m", "pip", "install", "--no-input", *args]
    # No download cache: the overlay usually lives on a memory-backed tmpfs and is installed once.
    return [str(overlay.python), "-m", "pip", "install", "--no-input", "--no-cache-dir", *args]


def activate(overlay: Overlay) -> None:
    """Put the overlay's packages before the image's in this process (and in the processes it spawns
    through multiprocessing, which copy ``sys.path``)."""
    folder = str(overlay.site_packages)
    if folder in sys.path:
        return
    before = list(sys.path)
    site.addsitedir(folder)  # appends it and what its .pth files name
    added = [path for path in sys.path if path not in before]
    first_image = min((before.index(path) for path in image_site_packages() if path in before), default=len(before))
    sys.path[:] = [*before[:first_image], *added, *before[first_image:]]
    importlib.invalidate_caches()


def child_environment(overlay: Overlay, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for child processes that should see the overlay: its packages on PYTHONPATH, its scripts on PATH."""
    extended = dict(env)
    for name, folder in (("PYTHONPATH", overlay.site_packages), ("PATH", overlay.bin_dir)):
        extended[name] = os.pathsep.join(filter(None, [str(folder), env.get(name)]))
    return extended


def noexec_reason(overlay: Overlay) -> str | None:
    """Why compiled extensions installed into the overlay cannot load, or None when they can (or there are none)."""
    if not os.statvfs(overlay.root).f_flag & os.ST_NOEXEC:
        return None
    site_packages = overlay.site_packages
    compiled = sorted({path.relative_to(site_packages).parts[0] for path in site_packages.rglob("*.so")}
                      - {folder.name for folder in site_packages.glob("*.libs")})  # libraries the wheels bundle
    if not compiled:
        return None
    return (f"compiled extensions ({', '.join(compiled)}) cannot load from {overlay.root}: its filesystem is "
            "mounted noexec; mount the temporary folder with exec (docker run's --tmpfs is noexec unless its "
            "options include exec)")
