"""A model's own ``code/inference.py`` on TorchServe, run the way SageMaker's PyTorch inference
toolkit runs it (its ``HandlerService`` and ``Transformer``).

The archive holds the SageMaker model folder as it is (``model.pth``, ``code/inference.py``):
the toolkit packs ``/opt/ml/model`` with ``--extra-files`` the same way, so ``model_dir`` here is
that folder. ``model_fn(model_dir)`` runs once when the worker starts. Every request of the batch
TorchServe hands over then goes through ``input_fn``, ``predict_fn`` and ``output_fn`` on its own:
one call chain per request, even in a batch, as the toolkit does. A missing or ``*/*`` Accept
means JSON; JSON and CSV bodies reach ``input_fn`` as text, anything else as bytes.
"""

import importlib.util
import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)
DEFAULT_ACCEPT = "application/json"
TEXT_TYPES = ("application/json", "text/csv")


class SageMakerHandlerService:
    def __init__(self):
        self.module = None
        self.model = None

    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        code = os.path.join(model_dir, "code")
        sys.path.insert(0, code)  # the toolkit puts code/ on the path for the module's own imports
        spec = importlib.util.spec_from_file_location("inference", os.path.join(code, "inference.py"))
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)
        self.model = self.module.model_fn(model_dir)
        # The benchmark checks this line to confirm the thread setting reached the worker.
        logger.info("bench handler ready: torch threads=%d", torch.get_num_threads())

    def handle(self, data, context):
        responses = []
        for index, request in enumerate(data):
            body = request.get("body")
            if body is None:
                body = request.get("data")
            headers = context.get_all_request_header(index)
            content_type = headers.get("Content-Type") or headers.get("content-type") or ""
            accept = headers.get("Accept") or headers.get("accept")
            if not accept or accept == "*/*":
                accept = DEFAULT_ACCEPT
            if content_type.split(";", 1)[0].strip().lower() in TEXT_TYPES and isinstance(body, bytes | bytearray):
                body = body.decode("utf-8")
            prediction = self.module.predict_fn(self.module.input_fn(body, content_type), self.model)
            result = self.module.output_fn(prediction, accept)
            answer, answer_type = result if isinstance(result, tuple) else (result, accept)
            context.set_response_content_type(index, answer_type)
            responses.append(answer)
        return responses
