"""A training script as SageMaker PyTorch users write it: argparse with SM_* defaults, optional
torch.distributed, and the state dict saved to SM_MODEL_DIR/model.pth."""

import argparse
import json
import os

import humanize  # from requirements.txt
import torch
import torch.distributed as dist
import torch.nn.functional as F
from net import TRANSFORM, Net
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--model-dir", type=str, default=os.environ["SM_MODEL_DIR"])
    parser.add_argument("--train", type=str, default=os.environ["SM_CHANNEL_TRAINING"])
    parser.add_argument("--output-data-dir", type=str, default=os.environ["SM_OUTPUT_DATA_DIR"])
    args = parser.parse_args()
    if args.exit_code:
        raise SystemExit(args.exit_code)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    print(f"rank {rank} of {os.environ.get('WORLD_SIZE', '1')} on {os.environ['SM_CURRENT_HOST']}", flush=True)

    torch.manual_seed(0)
    data = datasets.ImageFolder(args.train, transform=TRANSFORM)
    sampler = DistributedSampler(data, seed=0) if distributed else None
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler)
    model = Net(len(data.classes))
    trained = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.Adam(trained.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        seen = correct = 0
        for images, labels in loader:
            optimizer.zero_grad()
            logits = trained(images)
            F.cross_entropy(logits, labels).backward()
            optimizer.step()
            seen += len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
        print(f"epoch {epoch} train_accuracy={correct / seen:.4f}", flush=True)

    if rank == 0:
        torch.save(model.state_dict(), os.path.join(args.model_dir, "model.pth"))
        with open(os.path.join(args.model_dir, "classes.json"), "w") as f:
            json.dump(data.classes, f)
        os.makedirs(args.output_data_dir, exist_ok=True)
        with open(os.path.join(args.output_data_dir, "summary.txt"), "w") as f:
            f.write(f"trained on {humanize.intcomma(len(data) * args.epochs)} images\n")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
