"""SageMaker control plane for the image: train, tune, deploy, transform, predict, delete.

``python -m deploy --help``; every subcommand has its own ``--help``. Built on the SageMaker Python
SDK v2 (see the README for why), with ``--local`` for the SDK's local mode (Docker on this
machine, nothing in AWS).
"""

import logging
import os

# Both must happen before the first ``import sagemaker``, and every module that imports it sits
# below this package, so this is the one place that guarantees it:
# - SDK v2 warns on import that v3 exists; this package uses v2 on purpose.
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
# - while importing, the SDK looks for its config files and prints "Not applying SDK defaults
#   from location: ..." to stdout for each one missing, unless this logger already has a level
#   (``--verbose`` turns it back to INFO).
if logging.getLogger("sagemaker.config").level == logging.NOTSET:
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)
