"""Training (CCFNET.md, "Schedule"): AdamW, cosine warm restarts, on-device augmentation, resumable.

The whole training set is resized once and kept as one tensor on the training device; each step augments a
batch there and builds its targets there, so a GPU is never waiting on Python data loading and a CPU run
spends its time in the network.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ccfnet_core.augment import AugmentConfig, augment_batch
from ccfnet_core.checkpoint import ModelCard, load_model, new_card, save_model
from ccfnet_core.geometry import to_input_space
from ccfnet_core.inference import pick_device, predict_images
from ccfnet_core.loss import LossWeights, ccfnet_loss, pos_weight
from ccfnet_core.model import CCFNet, create_model
from ccfnet_core.sample import Prediction, SliceSample
from ccfnet_core.structures import DISC_INDICES, VERTEBRA_INDICES
from ccfnet_core.targets import build_targets


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the paper's recipe for R18-MSC (CCFNET.md)."""

    arch: str = "r18-msc"
    input_size: int = 512
    sigma: float = 16.0
    epochs: int = 60
    repeats: int = 10
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 5e-4
    t0: int = 20
    t_mult: int = 2
    eta_min: float = 5e-5
    aug_strength: float = 1.0
    heatmap_weight: float = 1.0
    offset_weight: float = 2.0
    class_weight: float = 0.001
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    init_from: str = ""
    include_flagged: bool = False
    eval_every: int = 5
    max_steps: int = 0
    training_data: str = ""
    notes: str = ""

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)

    def loss_weights(self) -> LossWeights:
        return LossWeights(
            heatmap=self.heatmap_weight,
            offset_y=self.offset_weight,
            offset_x=self.offset_weight,
            vertebra_class=self.class_weight,
            disc_class=self.class_weight,
        )


@dataclass
class PreparedData:
    """Samples resized once to the input size, as tensors on the training device."""

    images: Tensor  # (N, 3, S, S) float
    points: Tensor  # (N, 11, 2) edge coordinates of the input; NaN missing
    abnormal: Tensor  # (N, 11) 1 / 0 / NaN
    mm_per_pixel: Tensor  # (N, 2) as (x, y) at input resolution
    study_ids: list[str] = field(default_factory=list)


def prepare(samples: Sequence[SliceSample], size: int, device: torch.device) -> PreparedData:
    images, points, abnormal, spacing = [], [], [], []
    for sample in samples:
        tensor = torch.from_numpy(np.ascontiguousarray(sample.image, dtype=np.float32))[None]
        images.append(F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[0])
        points.append(to_input_space(sample.points, sample.height, sample.width, size))
        abnormal.append(sample.abnormal_targets())
        row_mm, col_mm = sample.spacing_mm
        spacing.append([col_mm * sample.width / size, row_mm * sample.height / size])
    return PreparedData(
        images=torch.stack(images).to(device),
        points=torch.tensor(np.stack(points), dtype=torch.float32, device=device),
        abnormal=torch.tensor(np.stack(abnormal), dtype=torch.float32, device=device),
        mm_per_pixel=torch.tensor(spacing, dtype=torch.float32, device=device),
        study_ids=[s.study_id for s in samples],
    )


def class_pos_weights(samples: Sequence[SliceSample]) -> tuple[float, float]:
    """(vertebra, disc) BCE pos_weight from the class counts of the training samples."""
    targets = np.stack([s.abnormal_targets() for s in samples])

    def weight(indices: Sequence[int]) -> float:
        values = targets[:, list(indices)]
        values = values[np.isfinite(values)]
        return pos_weight(int((values == 1).sum()), int((values == 0).sum()))

    return weight(VERTEBRA_INDICES), weight(DISC_INDICES)


EvalFn = Callable[[list[Prediction]], dict[str, float]]


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX), so bf16 autocast is faster than fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def uses_bf16(device: torch.device, amp: bool) -> bool:
    """bf16 autocast on CUDA, and on CPUs with native bf16: 2.5x faster training on a 2-core AVX512-BF16 CPU
    (bench/train_speed.py), the same numerics the GPU runs already train with."""
    return amp and (device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()))


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _lr_at(cfg: TrainConfig, epoch_float: float) -> float:
    """Cosine annealing with warm restarts (T0, Tmult), as torch's scheduler, as a pure function."""
    t_cur, t_i = epoch_float, float(cfg.t0)
    while t_cur >= t_i:
        t_cur -= t_i
        t_i *= cfg.t_mult
    return cfg.eta_min + (cfg.lr - cfg.eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


class Trainer:
    """Trains one model on a set of samples, optionally watching a held-out set; resumes from `out_dir`."""

    def __init__(
        self,
        cfg: TrainConfig,
        train_samples: Sequence[SliceSample],
        out_dir: Path,
        val_samples: Sequence[SliceSample] = (),
        evaluate: Callable[[Sequence[SliceSample], list[Prediction]], dict[str, Any]] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ):
        if not train_samples:
            raise ValueError("no training samples")
        self.cfg = cfg
        self.out_dir = out_dir
        self.device = pick_device(cfg.device)
        self.train_samples = list(train_samples)
        self.val_samples = list(val_samples)
        self.evaluate = evaluate
        self.progress = progress
        torch.manual_seed(cfg.seed)
        self.model: CCFNet = self._initial_model().to(self.device)
        self.bf16 = uses_bf16(self.device, cfg.amp)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.bf16:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.order_rng = np.random.default_rng(cfg.seed)
        self.epoch = 0
        self.step = 0
        self._val_keys: list[str] = []
        self.data = prepare(self.train_samples, cfg.input_size, self.device)
        self.pos_weights = class_pos_weights(self.train_samples)
        self.augment = AugmentConfig().scaled(cfg.aug_strength)

    def _initial_model(self) -> CCFNet:
        if self.cfg.init_from:
            model, card = load_model(Path(self.cfg.init_from))
            if card.arch != self.cfg.arch:
                raise ValueError(f"init_from is a {card.arch} checkpoint, training {self.cfg.arch}")
        else:
            model = create_model(self.cfg.arch)
        if not isinstance(model, CCFNet):
            raise ValueError(f"{self.cfg.arch} is a pair: train its two networks, then pair them (ccfnet_core.pair)")
        return model.train()

    @property
    def state_path(self) -> Path:
        return self.out_dir / "state.pt"

    def _save_state(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "config": asdict(self.cfg),
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "order_rng": self.order_rng.bit_generator.state,
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def try_resume(self) -> bool:
        """Continue from `state.pt` in out_dir when it exists and was made with the same configuration."""
        if not self.state_path.is_file():
            return False
        state = torch.load(self.state_path, map_location=self.device, weights_only=False)
        if state["config"] != asdict(self.cfg):
            raise ValueError(f"{self.state_path} was written with another configuration; use a new --out")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu() if self.device.type == "cpu" else state["generator"])
        self.order_rng.bit_generator.state = state["order_rng"]
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        return True

    def _log_row(self, row: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "history.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.train_samples) * self.cfg.repeats / self.cfg.batch_size))

    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        n = len(self.train_samples)
        order = np.concatenate([self.order_rng.permutation(n) for _ in range(cfg.repeats)])
        steps = self._steps_per_epoch()
        sums: dict[str, float] = {}
        for i in range(steps):
            idx = torch.as_tensor(order[i * cfg.batch_size : (i + 1) * cfg.batch_size], device=self.device)
            if idx.numel() < 2:
                continue
            lr = _lr_at(cfg, self.epoch + i / steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images, points = augment_batch(
                self.data.images[idx], self.data.points[idx], self.data.mm_per_pixel[idx], self.augment,
                self.generator,
            )
            targets = build_targets(points, self.data.abnormal[idx], cfg.input_size, self.model.stride, cfg.sigma)
            if self.bf16:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(self.device, self.bf16):
                output = self.model(images)
            parts = ccfnet_loss(output, targets, cfg.loss_weights(), *self.pos_weights)
            self.optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            self.optimizer.step()
            self.step += 1
            for key, value in parts.as_floats().items():
                sums[key] = sums.get(key, 0.0) + value
            if self.progress:
                self.progress("step", i + 1, steps)
            if cfg.max_steps and self.step >= cfg.max_steps:
                break
        count = max(1, min(steps, i + 1))
        return {f"loss_{k}": v / count for k, v in sums.items()} | {"lr": lr}

    def predict(self, samples: Sequence[SliceSample]) -> list[Prediction]:
        return predict_images(
            self.model, [s.image for s in samples], self.cfg.input_size, self.model.stride, self.device
        )

    def fit(self) -> dict[str, Any]:
        """Run (or finish) the schedule; returns the last evaluation on the held-out set, if any."""
        self.try_resume()
        last_eval: dict[str, Any] = {}
        while self.epoch < self.cfg.epochs:
            started = time.perf_counter()
            row: dict[str, Any] = {"epoch": self.epoch + 1, **self.train_epoch()}
            row["seconds"] = round(time.perf_counter() - started, 2)
            self.epoch += 1
            is_last = self.epoch >= self.cfg.epochs or (self.cfg.max_steps and self.step >= self.cfg.max_steps)
            if self.val_samples and self.evaluate:
                # Evaluated at epoch 1 too, so that history.csv's header holds the val_ columns from the start.
                if self.epoch == 1 or self.epoch % self.cfg.eval_every == 0 or is_last:
                    last_eval = self.evaluate(self.val_samples, self.predict(self.val_samples))
                    self._val_keys = [k for k, v in last_eval.items() if isinstance(v, int | float)]
                    row.update({f"val_{k}": last_eval[k] for k in self._val_keys})
                else:
                    row.update({f"val_{k}": "" for k in self._val_keys})
            self._log_row(row)
            self._save_state()
            if self.progress:
                self.progress("epoch", self.epoch, self.cfg.epochs)
            if is_last:
                break
        return last_eval

    def export(self, path: Path, card_fields: dict[str, Any], half: bool = False) -> ModelCard:
        card = new_card(
            arch=self.cfg.arch,
            input_size=self.cfg.input_size,
            stride=self.model.stride,
            sigma=self.cfg.sigma,
            recipe=asdict(self.cfg),
            **card_fields,
        )
        return save_model(path, self.model, card, half=half)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
