"""SageMaker control plane for the image: train, tune, deploy, transform, predict, delete.

``python -m deploy --help``; every subcommand has its own ``--help``. Commands send SageMaker's
API requests through boto3, or with ``--local`` to the SageMaker Python SDK's local mode (v2 or v3:
Docker on this machine, nothing in AWS); see :mod:`deploy.session`.
"""

import logging
import os

# Both must happen before the first ``import sagemaker``, and every module that imports it sits
# below this package, so this is the one place that guarantees it:
# - SDK v2 warns on import that v3 exists; local mode works with either.
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
# - while importing, the SDK looks for its config files and prints "Not applying SDK defaults
#   from location: ..." to stdout for each one missing, unless this logger already has a level
#   (``--verbose`` turns it back to INFO).
if logging.getLogger("sagemaker.config").level == logging.NOTSET:
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)
