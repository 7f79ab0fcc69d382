"""Training throughput of the entry point (``python -m train``) against a bare PyTorch loop.

Both train the same model on the same generated ImageFolder with the same batch size, image size,
augmentation and DataLoader workers, one after the other in alternation (A B A B ...) so that
noise on a shared machine hits both alike. Throughput is images per second over the epochs
after the first (warm-up). Target: entry point >= 0.9x the bare loop.

    python bench/train_throughput.py [--rounds 3] [--epochs 3] [--architecture resnet18]

Writes bench/results/train_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BARE_LOOP = r'''
import sys, time, torch, torchvision
from torch import nn
from torchvision.transforms import v2
data, arch, epochs, batch, size, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.manual_seed(0)
transform = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                        v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
dataset = torchvision.datasets.ImageFolder(data, transform=transform)
loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
model = torchvision.models.get_model(arch, weights=None, num_classes=len(dataset.classes))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
criterion = nn.CrossEntropyLoss()
model.train()
for epoch in range(1, epochs + 1):
    seen, started = 0, time.perf_counter()
    for images, targets in loader:
        loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
        seen += len(targets)
    print(f"metric: train_images_per_second={seen / (time.perf_counter() - started):.6f} epoch={epoch}", flush=True)
'''

METRIC = re.compile(r"metric: train_images_per_second=([0-9.]+) epoch=(\d+)")


def steady_rate(output: str) -> float:
    rates = [float(value) for value, epoch in METRIC.findall(output) if int(epoch) > 1]
    if not rates:
        raise RuntimeError(f"no steady-state throughput in output:\n{output[-2000:]}")
    return statistics.mean(rates)


def run(command: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{result.stderr[-3000:]}")
    return steady_rate(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--per-class", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    args = parser.parse_args()

    from deploy.host import write_image_folder

    with tempfile.TemporaryDirectory() as scratch:
        data = write_image_folder(Path(scratch) / "data", args.per_class, seed=0, size=128)
        common = [str(args.epochs), str(args.batch_size), str(args.image_size), str(args.workers)]
        bare_cmd = [sys.executable, "-c", BARE_LOOP, str(data), args.architecture, *common]
        entry_cmd = [sys.executable, "-m", "train", "--train", str(data), "--architecture", args.architecture, "--pretrained", "false", "--epochs", str(args.epochs),
                     "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
                     "--workers", str(args.workers), "--learning-rate", "0.01"]
        bare, entry = [], []
        for round_ in range(1, args.rounds + 1):
            bare.append(run(bare_cmd))
            # A fresh base folder each time: the entry point would otherwise resume from the
            # previous round's checkpoints.
            entry.append(run([*entry_cmd, "--base-dir", str(Path(scratch) / f"ml-{round_}")]))
            print(f"round {round_}: bare {bare[-1]:.1f} img/s, entry point {entry[-1]:.1f} img/s", flush=True)

    ratio = statistics.median(entry) / statistics.median(bare)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores, torch {__import__('torch').__version__}",
        "settings": vars(args) | {"output": str(args.output)},
        "bare_loop_images_per_second": bare,
        "entry_point_images_per_second": entry,
        "median_bare": statistics.median(bare),
        "median_entry_point": statistics.median(entry),
        "ratio": ratio,
        "target": ">= 0.9",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| | images/s (median of {args.rounds}) |\n|---|---|\n| bare PyTorch loop | {result['median_bare']:.1f} |\n"
          f"| entry point | {result['median_entry_point']:.1f} |\n| ratio | {ratio:.3f} |")


if __name__ == "__main__":
    main()
