"""CPU (or CUDA) seconds per training image and milliseconds per inference, per architecture and input size.

    python bench/train_speed.py [--arch r18-msc] [--sizes 256,512] [--steps 3] [--batch 32]
Training is timed in float32 and, where the trainer would use it (CUDA, or a CPU with native bf16), with bf16
autocast and channels-last as `ccfnet_core.train` runs it. Random inputs (the cost does not depend on the
pixels). Prints a table; no pass/fail.
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
from ccfnet_core.train import uses_bf16


def train_seconds_per_image(
    arch: str, size: int, batch: int, steps: int, device: torch.device, bf16: bool = False
) -> float:
    model = create_model(arch).to(device).train()
    images = torch.rand(batch, 3, size, size, device=device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    points = torch.rand(batch, 11, 2, device=device) * size
    targets = build_targets(points, torch.zeros(batch, 11, device=device), size, model.stride, size / 32)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            output = model(images)
        loss = ccfnet_loss(output, targets).total
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
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"{args.arch} on {device} ({torch.get_num_threads()} threads)")
    bf16 = uses_bf16(device, amp=True)
    print(f"{'input':>6}{'train s/image fp32':>20}{'train s/image bf16':>20}{'inference ms (flip TTA)':>26}")
    for size in (int(s) for s in args.sizes.split(",")):
        fp32 = train_seconds_per_image(args.arch, size, args.batch, args.steps, device)
        fast = train_seconds_per_image(args.arch, size, args.batch, args.steps, device, bf16=True) if bf16 else None
        infer = inference_ms(args.arch, size, 5, device)
        fast_text = f"{fast:>20.3f}" if fast is not None else f"{'n/a (no native bf16)':>20}"
        print(f"{size:>6}{fp32:>20.3f}{fast_text}{infer:>26.1f}")


if __name__ == "__main__":
    main()
