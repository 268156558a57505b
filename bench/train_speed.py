"""CPU (or CUDA) seconds per training image and milliseconds per inference, per architecture and input size.

    python bench/train_speed.py [--arch r18-msc] [--sizes 256,512] [--steps 3] [--batch 8]
Random inputs (the cost does not depend on the pixels). Prints a table; no pass/fail.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ccfnet_core.inference import pick_device, predict_images
from ccfnet_core.loss import ccfnet_loss
from ccfnet_core.model import create_model
from ccfnet_core.targets import build_targets


def train_seconds_per_image(arch: str, size: int, batch: int, steps: int, device: torch.device) -> float:
    model = create_model(arch).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    images = torch.rand(batch, 3, size, size, device=device)
    points = torch.rand(batch, 11, 2, device=device) * size
    targets = build_targets(points, torch.zeros(batch, 11, device=device), size, model.stride, size / 32)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        loss = ccfnet_loss(model(images), targets).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - started)
    return float(np.median(times)) / batch


def inference_ms(arch: str, size: int, repeat: int, device: torch.device) -> float:
    model = create_model(arch).to(device).eval()
    image = np.random.default_rng(0).random((3, 384, 346), dtype=np.float32)
    predict_images(model, [image], size, model.stride, device)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        predict_images(model, [image], size, model.stride, device)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="r18-msc")
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"{args.arch} on {device} ({torch.get_num_threads()} threads)")
    print(f"{'input':>6}{'train s/image':>15}{'inference ms (flip TTA)':>26}")
    for size in (int(s) for s in args.sizes.split(",")):
        train = train_seconds_per_image(args.arch, size, args.batch, args.steps, device)
        infer = inference_ms(args.arch, size, 5, device)
        print(f"{size:>6}{train:>15.3f}{infer:>26.1f}")


if __name__ == "__main__":
    main()
