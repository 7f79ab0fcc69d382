"""The GPU path's forward passes: what ``Predictor.infer`` does on CUDA, and the variants it could
take, for EfficientNet-Lite0 and ResNet-50 at the batch sizes a server runs.

    python bench/gpu_forward.py [--output bench/results/gpu_forward.json]

Variants: float16 or float32 weights and inputs; channels-last or contiguous inputs; cuDNN's
autotuner (``torch.backends.cudnn.benchmark``) off or on. ``server`` marks the variant
``Predictor.infer`` runs. Each point: 10 warm-up passes, then passes for ``--seconds``; images per
second and the median pass, timed from the host as the server sees it (the batch starts in host
memory and the logits end there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent)]

import torch  # noqa: E402

from classifier.models import create_model  # noqa: E402
from classifier.pretrained import default_model  # noqa: E402

BATCHES = (1, 8, 32, 128)


def passes(network: torch.nn.Module, batch: torch.Tensor, *, half: bool, channels_last: bool,
           seconds: float) -> list[float]:
    """Seconds per pass of the server's steps: pinned copy in, cast, layout, forward, logits out."""
    def one() -> None:
        inputs = batch.pin_memory().to("cuda", non_blocking=True)
        inputs = inputs.half() if half else inputs
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            network(inputs).float().cpu().numpy()

    for _ in range(10):
        one()
    timings: list[float] = []
    closes = time.perf_counter() + seconds
    while time.perf_counter() < closes and len(timings) < 100_000:
        began = time.perf_counter()
        one()
        timings.append(time.perf_counter() - began)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "gpu_forward.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_forward: no CUDA device")
    networks = {"efficientnet_lite0": default_model()[0].eval(), "resnet50": create_model("resnet50", 1000).eval()}
    rows = []
    for (name, network), autotune in itertools.product(networks.items(), (False, True)):
        torch.backends.cudnn.benchmark = autotune
        for half, channels_last in itertools.product((True, False), (True, False)):
            model = network.to("cuda", torch.float16 if half else torch.float32)
            model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            for size in BATCHES:
                timings = passes(model, torch.randn(size, 3, 224, 224), half=half, channels_last=channels_last,
                                 seconds=args.seconds)
                rows.append({"model": name, "precision": "float16" if half else "float32",
                             "layout": "channels_last" if channels_last else "contiguous", "cudnn_benchmark": autotune,
                             "server": half and channels_last and not autotune, "batch": size,
                             "images_per_s": size * len(timings) / sum(timings),
                             "pass_ms_p50": 1000 * statistics.median(timings)})
                print(json.dumps(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
