"""Script mode: run the user's own training script as SageMaker's PyTorch containers run it.

A job is in script mode when its hyperparameters name ``sagemaker_program`` (what the SageMaker
SDK's ``PyTorch(entry_point=..., source_dir=..., image_uri=...)`` sends) or ``SAGEMAKER_PROGRAM``
is set. Then, instead of the built-in trainer:

1. the source (``sagemaker_submit_directory``: ``s3://`` or local tarball, a folder, or the code
   already in ``/opt/ml/code``) is unpacked into ``/opt/ml/code``, unless that folder holds files;
2. its ``requirements.txt`` is installed with pip (``setup.py``: the package itself);
3. the script runs from ``/opt/ml/code`` with every ``SM_*`` variable SageMaker's training toolkit
   sets, and the other hyperparameters as ``--name value`` arguments (keys sorted, values
   JSON-decoded); with ``distribution={"torch_distributed": {"enabled": True}}`` it runs under
   ``torchrun`` across the processes and hosts of the job;
4. SIGTERM is passed on to it; its exit status is the job's, and a failure writes the script's
   last error to ``/opt/ml/output/failure``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from classifier import packages
from train.distributed import interface_exists, wait_for_host
from train.errors import JobError
from train.settings import read_json

logger = logging.getLogger(__name__)
MASTER_PORT = 7777  # what SageMaker's PyTorch container uses for torchrun's rendezvous
FAILURE_LIMIT = 1024
FRAMEWORK_PREFIX = "sagemaker_"
# The SDK's own keys; any other sagemaker_* key is a framework parameter (SM_FRAMEWORK_PARAMS).
SDK_KEYS = frozenset({"sagemaker_program", "sagemaker_submit_directory", "sagemaker_container_log_level",
                      "sagemaker_job_name", "sagemaker_region"})
UNSUPPORTED_DISTRIBUTIONS = {
    "sagemaker_pytorch_ddp_enabled": "pytorchddp",
    "sagemaker_distributed_dataparallel_enabled": "smdistributed",
    "sagemaker_mpi_enabled": "mpi",
}
# torchrun's mark on each line a process wrote (its local rank), then torch.distributed's on a
# traceback's lines once the process joined a group (its global rank).
RANK_PREFIX = re.compile(r"^(\[default\d+\]:)?(\[rank\d+\]:)?\s?")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*")


class ScriptError(JobError):
    """Script mode could not start the user's script; the message is phrased for the user."""


def decode(value: Any) -> Any:
    """A hyperparameter as SageMaker's toolkit reads it: JSON when it parses, else the raw string."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _env_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


def _arg_value(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{key}={item}" for key, item in value.items())
    return str(value)


def to_args(hyperparameters: Mapping[str, Any]) -> list[str]:
    """``--key value`` pairs, keys sorted, as the training toolkit passes them (``-k`` for one letter)."""
    args = []
    for key in sorted(hyperparameters):
        args += [f"-{key}" if len(key) == 1 else f"--{key}", _arg_value(hyperparameters[key])]
    return args


@dataclass(frozen=True)
class Job:
    """What a script-mode job needs to know, read from /opt/ml/input/config and the environment."""

    base_dir: Path
    program: str
    submit_directory: str | None
    hyperparameters: dict[str, Any]  # the user's, JSON-decoded
    framework_params: dict[str, Any]  # other sagemaker_* keys (distribution settings)
    resource_config: dict[str, Any]
    input_data_config: dict[str, Any]
    hosts: tuple[str, ...]
    current_host: str
    num_gpus: int
    num_cpus: int
    log_level: int = 20
    job_name: str = ""
    environ: Mapping[str, str] = field(default_factory=dict)

    @property
    def code_dir(self) -> Path:
        return self.base_dir / "code"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def interface(self) -> str:
        return str(self.resource_config.get("network_interface_name") or "eth0")

    @property
    def torch_distributed(self) -> bool:
        return bool(self.framework_params.get("sagemaker_torch_distributed_enabled"))

    @property
    def processes_per_host(self) -> int:
        explicit = self.framework_params.get("sagemaker_mpi_num_of_processes_per_host")
        return int(explicit) if explicit else max(1, self.num_gpus)

    def channels(self) -> dict[str, Path]:
        data = self.base_dir / "input" / "data"
        names = set(self.input_data_config)
        if data.is_dir():
            names |= {entry.name for entry in data.iterdir() if entry.is_dir()}
        return {name: data / name for name in sorted(names)}


def read_job(base_dir: Path, environ: Mapping[str, str], num_gpus: int | None = None) -> Job | None:
    """The script-mode job configured under ``base_dir``, or None when the job names no script."""
    config = base_dir / "input" / "config"
    raw = read_json(config / "hyperparameters.json") or {}
    if not isinstance(raw, dict):
        raise ScriptError("hyperparameters.json must hold a JSON object")
    values = {key: decode(value) for key, value in raw.items()}
    program = values.get("sagemaker_program") or environ.get("SAGEMAKER_PROGRAM")
    if not program:
        return None
    resource = read_json(config / "resourceconfig.json") or {}
    hosts = tuple(sorted(resource.get("hosts") or [socket.gethostname()]))
    if num_gpus is None:
        num_gpus = torch.cuda.device_count()
    return Job(
        base_dir=base_dir,
        program=str(program),
        submit_directory=values.get("sagemaker_submit_directory") or environ.get("SAGEMAKER_SUBMIT_DIRECTORY"),
        hyperparameters={key: value for key, value in values.items() if not key.startswith(FRAMEWORK_PREFIX)},
        framework_params={key: value for key, value in values.items()
                          if key.startswith(FRAMEWORK_PREFIX) and key not in SDK_KEYS},
        resource_config=resource,
        input_data_config=read_json(config / "inputdataconfig.json") or {},
        hosts=hosts,
        current_host=str(resource.get("current_host") or hosts[0]),
        num_gpus=num_gpus,
        num_cpus=os.cpu_count() or 1,
        log_level=int(values.get("sagemaker_container_log_level") or 20),
        job_name=str(values.get("sagemaker_job_name") or environ.get("TRAINING_JOB_NAME") or ""),
        environ=environ,
    )


def environment(job: Job) -> dict[str, str]:
    """The SM_* variables SageMaker's training toolkit gives a user script, plus PyTorch's own."""
    base = job.base_dir
    channels = job.channels()
    module_name = Path(job.program).stem if job.program.endswith(".py") else job.program
    instance_type = job.resource_config.get("current_instance_type", "local")
    group = {"instance_group_name": "homogeneousCluster", "instance_type": instance_type, "hosts": list(job.hosts)}
    properties: dict[str, Any] = {
        "hosts": list(job.hosts), "current_host": job.current_host, "current_instance_type": instance_type,
        "num_gpus": job.num_gpus, "num_cpus": job.num_cpus, "num_neurons": 0, "log_level": job.log_level,
        "network_interface_name": job.interface, "model_dir": str(base / "model"), "input_dir": str(base / "input"),
        "input_config_dir": str(base / "input" / "config"), "output_dir": str(job.output_dir),
        "output_data_dir": str(job.output_dir / "data"),
        "output_intermediate_dir": str(job.output_dir / "intermediate"),
        "channels": list(channels), "hps": job.hyperparameters, "user_args": to_args(job.hyperparameters),
        "module_name": module_name, "module_dir": job.submit_directory or str(job.code_dir),
        "user_entry_point": job.program, "framework_module": "train.script:run",
        "framework_params": job.framework_params, "resource_config": job.resource_config,
        "input_data_config": job.input_data_config, "current_instance_group": "homogeneousCluster",
        "current_instance_group_hosts": list(job.hosts), "instance_groups": ["homogeneousCluster"],
        "instance_groups_dict": {"homogeneousCluster": group},
        "distribution_instance_groups": ["homogeneousCluster"] if job.torch_distributed else [],
        "is_hetero": False,
    }
    env = {f"SM_{key.upper()}": _env_value(value) for key, value in properties.items()}
    env.update({f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()})
    env.update({f"SM_HP_{key.upper()}": _env_value(value) for key, value in job.hyperparameters.items()})
    training_env = {key: value for key, value in properties.items() if key not in ("user_args", "hps")}
    training_env.update({
        "hyperparameters": job.hyperparameters, "additional_framework_parameters": job.framework_params,
        "channel_input_dirs": {name: str(path) for name, path in channels.items()},
        "master_hostname": job.hosts[0], "is_master": job.current_host == job.hosts[0], "job_name": job.job_name,
        "is_modelparallel_enabled": None,
    })
    env["SM_TRAINING_ENV"] = _env_value(training_env)
    env.update({"MASTER_ADDR": job.hosts[0], "MASTER_PORT": str(MASTER_PORT), "NCCL_IB_DISABLE": "1",
                "NCCL_DEBUG": "WARN"})
    if interface_exists(job.interface):
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = job.interface
    return env


def _extract(archive: Path, target: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")  # no absolute paths, links out or devices


def fetch_source(job: Job) -> None:
    """Put the job's source into /opt/ml/code, unless it is already there."""
    code = job.code_dir
    if code.is_dir() and any(code.iterdir()):
        return
    source = job.submit_directory
    if not source:
        raise ScriptError(f"the job names the script {job.program!r} but no source: set sagemaker_submit_directory "
                          f"(the SDK's source_dir) or put the code in {code}")
    code.mkdir(parents=True, exist_ok=True)
    if source.startswith("s3://"):
        bucket, _, key = source[len("s3://"):].partition("/")
        with tempfile.TemporaryDirectory() as scratch:
            archive = Path(scratch) / "sourcedir.tar.gz"
            try:
                import boto3

                boto3.client("s3").download_file(bucket, key, str(archive))
            except Exception as exc:
                raise ScriptError(f"could not download the source {source}: {type(exc).__name__}: {exc}") from None
            _extract(archive, code)
        return
    path = Path(source.removeprefix("file://"))
    if path.is_dir():
        shutil.copytree(path, code, dirs_exist_ok=True)
    elif path.is_file() and tarfile.is_tarfile(path):
        _extract(path, code)
    else:
        raise ScriptError(f"the source {source} is neither a folder, a tarball nor an s3:// URI")


class Tail:
    """Copies a child's stream through, keeping its last lines for the failure file."""

    def __init__(self, stream: TextIO, sink: TextIO, lines: int = 200) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self._thread = threading.Thread(target=self._copy, args=(stream, sink), daemon=True)
        self._thread.start()

    def _copy(self, stream: TextIO, sink: TextIO) -> None:
        with stream:
            for line in stream:
                sink.write(line)
                sink.flush()
                self.lines.append(line.rstrip("\n"))

    def join(self) -> None:
        self._thread.join(10)

    def last_error(self) -> str:
        """The script's own error: the first line naming an exception after its first traceback
        (torchrun's ChildFailedError summary comes later and says less), else the last lines."""
        lines = [RANK_PREFIX.sub("", line.strip()) for line in self.lines]
        start = next((index for index, line in enumerate(lines) if line.startswith("Traceback")), 0)
        for line in lines[start:]:
            if EXCEPTION_LINE.match(line) and "ChildFailedError" not in line:
                return line
        return "\n".join(line for line in lines[-5:] if line)


def run_logged(command: Sequence[str], *, cwd: Path, env: Mapping[str, str]) -> tuple[int, Tail]:
    """Run ``command`` with SIGTERM and SIGINT passed on; stderr copied through and its tail kept."""
    process = subprocess.Popen(list(command), cwd=cwd, env=dict(env), stderr=subprocess.PIPE, text=True,
                               errors="replace", bufsize=1)
    assert process.stderr is not None
    tail = Tail(process.stderr, sys.stderr)

    def forward(signum: int, frame: object) -> None:
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    tail.join()
    return (128 - code if code < 0 else code), tail


def requirements_command(code: Path, overlay: packages.Overlay | None = None) -> list[str] | None:
    """pip for the source's setup.py (the package itself) and requirements.txt, or None for neither;
    into ``overlay`` when the image's packages are read-only."""
    wanted = (["."] if (code / "setup.py").is_file() else []) + (
        ["-r", "requirements.txt"] if (code / "requirements.txt").is_file() else [])
    return packages.pip_install(wanted, overlay) if wanted else None


def install_requirements(job: Job, env: Mapping[str, str]) -> dict[str, str]:
    """Install the source's requirements; the script's environment, which names the overlay's packages and
    scripts when they went there (the image's packages are read-only: see :mod:`classifier.packages`)."""
    code = job.code_dir
    if requirements_command(code) is None:
        return dict(env)
    try:
        overlay = packages.install_target()
    except RuntimeError as exc:
        raise ScriptError(f"InstallRequirementsError: {exc}") from None
    command = requirements_command(code, overlay)
    assert command is not None
    where = f" into {overlay.site_packages} (the image's packages are read-only)" if overlay else ""
    logger.info("installing the script's requirements%s: %s", where, shlex.join(command[2:]))
    status, tail = run_logged(command, cwd=code, env=env)
    if status != 0:
        raise ScriptError(
            f"InstallRequirementsError:\nExitCode {status}\nErrorMessage \"{tail.last_error()}\"\n"
            f"Command \"{shlex.join(command[2:])}\"\n(is the package index reachable from the container? pip "
            "reads PIP_INDEX_URL and PIP_EXTRA_INDEX_URL from the job's environment)"
        )
    if overlay is None:
        return dict(env)
    unloadable = packages.noexec_reason(overlay)
    if unloadable:
        raise ScriptError(f"InstallRequirementsError: {unloadable}")
    return packages.child_environment(overlay, env)


def command_for(job: Job, extra_args: Sequence[str] = ()) -> list[str]:
    """The script's command line: plain, or under torchrun for torch_distributed."""
    args = [*to_args(job.hyperparameters), *extra_args]
    if job.program.endswith(".sh"):
        # As the training toolkit runs it: executed, so its own shebang (bash, ...) applies.
        return ["/bin/sh", "-c", shlex.join([f"./{job.program}", *args])]
    if not job.torch_distributed:
        return [sys.executable, job.program, *args]
    # Each process's stderr goes through a file of its own and reaches ours line by line, marked
    # [default<rank>]: written straight to one pipe, the processes' tracebacks interleave mid-line.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(job.hosts)),
                "--nproc_per_node", str(job.processes_per_host), "--redirects", "2", "--tee", "2",
                "--log-dir", str(Path(tempfile.gettempdir()) / "torchrun")]
    if len(job.hosts) > 1:
        launcher += ["--master_addr", job.hosts[0], "--master_port", str(MASTER_PORT),
                     "--node_rank", str(job.hosts.index(job.current_host))]
    return [*launcher, job.program, *args]


def _wait_for_hosts(job: Job, timeout_s: float = 900) -> None:
    for host in job.hosts:
        if host != job.current_host:
            wait_for_host(host, timeout_s)


def run(job: Job, extra_args: Sequence[str] = ()) -> int:
    """Fetch, install and run the user's script (``extra_args`` after the hyperparameters' own);
    its exit status is returned."""
    for key, name in UNSUPPORTED_DISTRIBUTIONS.items():
        if job.framework_params.get(key):
            raise ScriptError(f"distribution {name!r} needs MPI, which this image does not have; use "
                              "distribution={'torch_distributed': {'enabled': True}} (torchrun) instead")
    fetch_source(job)
    if not (job.code_dir / job.program).is_file():
        found = ", ".join(sorted(entry.name for entry in job.code_dir.iterdir())[:10]) or "nothing"
        raise ScriptError(f"the entry point {job.program!r} is not in the source (it holds: {found})")
    for folder in (job.base_dir / "model", job.output_dir / "data", job.output_dir / "intermediate"):
        folder.mkdir(parents=True, exist_ok=True)  # as SageMaker provides them: scripts write there directly
    env = {**job.environ, **environment(job)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(job.code_dir), job.environ.get("PYTHONPATH")]))
    env = install_requirements(job, env)
    if len(job.hosts) > 1:
        _wait_for_hosts(job)
    if job.program.endswith(".sh"):
        script = job.code_dir / job.program
        script.chmod(script.stat().st_mode | 0o111)
    command = command_for(job, extra_args)
    logger.info("running the user's script on %s: %s", job.current_host, shlex.join(command))
    status, tail = run_logged(command, cwd=job.code_dir, env=env)
    if status == 0:
        (job.output_dir / "success").touch()
        return 0
    reason = (f"ExecuteUserScriptError:\nExitCode {status}\nErrorMessage \"{tail.last_error()}\"\n"
              f"Command \"{shlex.join(command)}\"")
    logger.error("the user's script failed with exit code %d", status)
    failure = job.output_dir / "failure"
    if not failure.exists():  # a reason the script wrote itself is kept
        failure.write_text(reason[:FAILURE_LIMIT])
    return status
