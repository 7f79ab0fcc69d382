"""Train an image classifier: ``python -m train [--flags]`` or ``docker run IMAGE train [--flags]``.

On SageMaker, everything comes from /opt/ml (see ``train.settings``); on any other machine, pass
paths and hyperparameters as flags, e.g.::

    python -m train --train data/ --model-dir model/ --epochs 5 --batch-size 32

When the job names a script of the user's own (``sagemaker_program``, as the SageMaker SDK's
``PyTorch(entry_point=...)`` sends it), that script runs instead (see ``train.script``); flags
given here are passed on to it after the hyperparameters.

With several GPUs (or ``--processes-per-host N``) this process starts one worker per GPU and
forwards SIGTERM to them; with several hosts (``resourceconfig.json``) the workers of all hosts
form one data-parallel job.

Exit codes: 0 trained; 1 failed (reason in ``<output>/failure``, traceback in the log);
143 stopped by SIGTERM after writing a checkpoint (start again to resume).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch.multiprocessing as mp

from classifier.logs import setup_logging
from train import script
from train.distributed import Topology, discover
from train.errors import JobError
from train.job import Outcome, run, select_device
from train.settings import Settings, base_dir_from, failure_file, resolve

logger = logging.getLogger("train")
FAILURE_LIMIT = 1024  # SageMaker keeps this many characters of the failure file
EXIT_STOPPED = 128 + signal.SIGTERM


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, JobError):
        return str(exc)  # already phrased for the user
    return f"{type(exc).__name__}: {exc}"


def write_failure(path: Path, reason: str, *, overwrite: bool = True) -> None:
    if path.exists() and not overwrite:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(reason[:FAILURE_LIMIT])
    except OSError:
        logger.exception("could not write the failure file %s", path)


def _worker(local_rank: int, settings: Settings, topology: Topology, log: tuple[str, bool]) -> None:
    """One local process of a multi-process job (started by torch.multiprocessing)."""
    setup_logging(log[0], json_format=log[1])
    try:
        outcome = run(settings, topology, local_rank)
    except Exception as exc:
        logger.exception("training failed in local rank %d", local_rank)
        write_failure(settings.paths.failure_file, describe_failure(exc), overwrite=False)
        sys.exit(1)
    sys.exit(EXIT_STOPPED if outcome is Outcome.STOPPED else 0)


def launch(settings: Settings, topology: Topology, log: tuple[str, bool]) -> int:
    """Run one worker per local process; SIGTERM is passed on so each can checkpoint."""
    context = mp.start_processes(_worker, args=(settings, topology, log),
                                 nprocs=topology.processes_per_host, join=False, start_method="spawn")

    def forward(signum: int, frame: object) -> None:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as exc:
        logger.error("local worker %d exited with code %s", exc.error_index, exc.exit_code)
        for process in context.processes:
            process.join(60)
        return EXIT_STOPPED if exc.exit_code == EXIT_STOPPED else 1
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    log = (environ.get("LOG_LEVEL", "INFO"), environ.get("LOG_FORMAT") == "json")
    setup_logging(log[0], json_format=log[1])
    failure = failure_file(argv, environ)
    failure.unlink(missing_ok=True)
    try:
        base_dir, script_args = base_dir_from(argv, environ)
        job = script.read_job(base_dir, environ)
        if job is not None:
            return script.run(job, script_args)
    except (Exception, KeyboardInterrupt) as exc:
        logger.exception("the user's script could not be run")
        write_failure(failure, describe_failure(exc))
        return 1
    try:
        settings = resolve(argv, environ)
        hp = settings.hyperparameters
        topology = discover(settings.paths.base_dir, environ,
                            use_cuda=select_device(hp.device).type == "cuda",
                            processes_per_host=hp.processes_per_host)
        logger.info("settings: %s", json.dumps(settings.to_dict(), sort_keys=True))
        logger.info("topology: host %s (%d of %d), %d process(es) per host",
                    topology.current_host, topology.host_rank + 1, len(topology.hosts),
                    topology.processes_per_host)
        if topology.processes_per_host > 1:
            return launch(settings, topology, log)
        outcome = run(settings, topology)
    except (Exception, KeyboardInterrupt) as exc:
        logger.exception("training failed")
        write_failure(failure, describe_failure(exc))
        return 1
    return EXIT_STOPPED if outcome is Outcome.STOPPED else 0


if __name__ == "__main__":
    sys.exit(main())
