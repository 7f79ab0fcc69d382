"""Train an image classifier: ``python -m train [--flags]`` or ``docker run IMAGE train [--flags]``.

On SageMaker, everything comes from /opt/ml (see ``train.settings``); on any other machine, pass
paths and hyperparameters as flags, e.g.::

    python -m train --train data/ --model-dir model/ --epochs 5 --batch-size 32

Any failure is logged with its traceback, summarised in ``<output>/failure`` (the job's
FailureReason on SageMaker) and ends the process with a non-zero exit code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from classifier.logs import setup_logging
from train.job import run
from train.settings import SettingsError, failure_file, resolve

logger = logging.getLogger("train")
FAILURE_LIMIT = 1024  # SageMaker keeps this many characters of the failure file


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, SettingsError):
        return str(exc)  # already phrased for the user
    return f"{type(exc).__name__}: {exc}"


def write_failure(path: os.PathLike[str] | str, reason: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(reason[:FAILURE_LIMIT])
    except OSError:
        logger.exception("could not write the failure file %s", path)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    setup_logging(environ.get("LOG_LEVEL", "INFO"), json_format=environ.get("LOG_FORMAT") == "json")
    failure = failure_file(argv, environ)
    failure.unlink(missing_ok=True)
    try:
        settings = resolve(argv, environ)
        logger.info("settings: %s", json.dumps(settings.to_dict(), sort_keys=True))
        run(settings)
    except (Exception, KeyboardInterrupt) as exc:
        logger.exception("training failed")
        write_failure(failure, describe_failure(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
