"""Inference milliseconds per study (one slice, flip TTA) for a checkpoint, on CPU and on CUDA if present.

    python bench/inference.py --checkpoint models/ccfnet-r18msc.pt [--data DIR] [--repeat 20]
Prints a table; no pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ccfnet_core.inference import Predictor


def time_device(checkpoint: Path, device: str, images: list[np.ndarray], repeat: int) -> list[float]:
    predictor = Predictor.from_checkpoint(checkpoint, device)
    predictor.predict(images[:1])
    times = []
    for i in range(repeat):
        image = images[i % len(images)]
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        predictor.predict([image])
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--devices", default="cpu,cuda")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.random((3, 384, 346), dtype=np.float32) for _ in range(4)]
    print(f"checkpoint: {args.checkpoint}  threads: {torch.get_num_threads()}")
    print(f"{'device':<8}{'input':>8}{'median ms':>12}{'p95 ms':>10}")
    for device in args.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        times = time_device(args.checkpoint, device, images, args.repeat)
        size = Predictor.from_checkpoint(args.checkpoint, "cpu").card.input_size
        p95 = sorted(times)[max(0, int(0.95 * len(times)) - 1)]
        print(f"{device:<8}{size:>8}{statistics.median(times):>12.1f}{p95:>10.1f}")


if __name__ == "__main__":
    main()
