"""The overlay pip installs into when the image's own packages are read-only, with real pip and
wheels made here (no package index)."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from classifier import packages
from serve import user_code


def wheel(folder: Path, name: str, version: str, *, requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel whose module ``name`` holds ``VERSION``."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                                          *(f"Requires-Dist: {requirement}\n" for requirement in requires)]),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}\n")
    files[f"{dist_info}/RECORD"] = "".join(record) + f"{dist_info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def pip(*args: str | Path, python: str | Path = sys.executable) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(python), "-m", "pip", "install", "--no-input", "--no-index", "--disable-pip-version-check",
                             *map(str, args)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def module_version(python: str | Path, module: str, *, env: dict[str, str] | None = None, setup: str = "") -> str:
    code = f"{setup}\nimport {module}\nprint({module}.VERSION, {module}.__file__)"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False,
                            env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@dataclass(frozen=True)
class Pinned:
    image: Path  # the image's packages: tinypkg 1.0
    overlay: packages.Overlay
    installs: tuple[str, ...]  # pip's output for needstiny, then for tinypkg==2.0


@pytest.fixture(scope="module")
def pinned(tmp_path_factory: pytest.TempPathFactory) -> Pinned:
    """An overlay over an image holding tinypkg 1.0, after installing a package that needs tinypkg
    and then tinypkg 2.0."""
    root = tmp_path_factory.mktemp("overlay")
    wheels = root / "wheels"
    wheels.mkdir()
    wheel(wheels, "tinypkg", "1.0")
    wheel(wheels, "tinypkg", "2.0")
    wheel(wheels, "needstiny", "1.0", requires=("tinypkg>=1",))
    image = root / "image-site-packages"
    pip("--find-links", wheels, "--target", image, "tinypkg==1.0")
    # The image's packages as the overlay sees them: the fake one, and this environment's (pip).
    overlay = packages.create_overlay(root / "overlay", [str(image), *packages.image_site_packages()])
    installs = tuple(pip("--find-links", wheels, requirement, python=overlay.python).stdout
                     for requirement in ("needstiny==1.0", "tinypkg==2.0"))
    return Pinned(image, overlay, installs)


def test_the_overlay_installs_what_is_missing_and_pins_without_touching_the_image(pinned: Pinned) -> None:
    needstiny, tinypkg = ([line for line in output.splitlines() if line.startswith("Successfully installed")]
                          for output in pinned.installs)
    assert needstiny == ["Successfully installed needstiny-1.0"], "what the image has is not installed again"
    assert tinypkg == ["Successfully installed tinypkg-2.0"]
    assert "outside environment" in pinned.installs[1]  # pip leaves the image's copy alone
    assert (pinned.image / "tinypkg-1.0.dist-info").is_dir()
    assert module_version(pinned.overlay.python, "tinypkg").startswith(f"2.0 {pinned.overlay.site_packages}")


def test_activate_puts_the_overlay_before_the_image_but_after_the_standard_library(pinned: Pinned) -> None:
    image, overlay = str(pinned.image), pinned.overlay
    as_image = f"import sys\nsys.path.append({image!r})"  # last, as site-packages are

    assert module_version(sys.executable, "tinypkg", setup=as_image).startswith("1.0 ")
    activated = module_version(sys.executable, "tinypkg", setup=as_image + textwrap.dedent(f"""
        import os
        from pathlib import Path
        from classifier import packages
        packages.image_site_packages = lambda: [{image!r}]
        packages.activate(packages.Overlay(Path({str(overlay.root)!r})))
        position = sys.path.index({str(overlay.site_packages)!r})
        assert sys.path.index(os.path.dirname(os.__file__)) < position < sys.path.index({image!r})
    """))
    assert activated.startswith(f"2.0 {overlay.site_packages}")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), image])}
    assert module_version(sys.executable, "tinypkg", env=env).startswith("1.0 ")
    child_env = packages.child_environment(overlay, env)
    assert module_version(sys.executable, "tinypkg", env=child_env).startswith("2.0 ")
    assert child_env["PATH"].split(os.pathsep)[0] == str(overlay.bin_dir)


def test_a_writable_environment_is_installed_into_directly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packages, "image_is_writable", lambda: True)
    assert packages.install_target(tmp_path) is None
    assert packages.pip_install(["-r", "requirements.txt"], None) == [
        sys.executable, "-m", "pip", "install", "--no-input", "-r", "requirements.txt"]
    assert not (tmp_path / packages.OVERLAY_FOLDER).exists()


def test_a_read_only_environment_gets_an_overlay_in_the_temporary_folder(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packages, "image_is_writable", lambda: False)
    overlay = packages.install_target(tmp_path)
    assert overlay is not None and overlay.root == tmp_path / packages.OVERLAY_FOLDER
    assert packages.pip_install(["x"], overlay)[0] == str(overlay.python)
    pth = (overlay.site_packages / packages.IMAGE_PTH).read_text().split()
    assert pth == packages.image_site_packages()
    assert packages.install_target(tmp_path) == overlay  # made once, found again

    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    with pytest.raises(RuntimeError, match="no overlay can be made in the temporary folder"):
        packages.install_target(not_a_folder)


def test_compiled_extensions_on_a_noexec_filesystem_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overlay = packages.Overlay(tmp_path)
    extension = overlay.site_packages / "fastthing" / "_speedups.cpython-311-x86_64-linux-gnu.so"
    bundled = overlay.site_packages / "fastthing.libs" / "libfast-1a2b.so"
    for path in (extension, bundled):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")

    class Flags:
        def __init__(self, flags: int) -> None:
            self.f_flag = flags

    monkeypatch.setattr(packages.os, "statvfs", lambda path: Flags(0))
    assert packages.noexec_reason(overlay) is None
    monkeypatch.setattr(packages.os, "statvfs", lambda path: Flags(os.ST_NOEXEC))
    reason = packages.noexec_reason(overlay)
    assert reason is not None and reason.startswith(f"compiled extensions (fastthing) cannot load from {tmp_path}:")
    assert "mount the temporary folder with exec" in reason
    extension.unlink()
    assert packages.noexec_reason(overlay) is None


def test_handler_requirements_go_into_the_overlay_and_onto_sys_path(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel(wheels, "handlerdep", "3.1")
    code = tmp_path / "model" / "code"
    code.mkdir(parents=True)
    (code / "requirements.txt").write_text(f"--no-index\n--find-links {wheels}\nhandlerdep==3.1\n")
    monkeypatch.setattr(packages, "image_is_writable", lambda: False)
    monkeypatch.setattr(packages.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))

    user_code.install_requirements(code)
    overlay = packages.Overlay(tmp_path / packages.OVERLAY_FOLDER)
    assert (overlay.site_packages / "handlerdep" / "__init__.py").is_file()
    assert str(overlay.site_packages) in sys.path
