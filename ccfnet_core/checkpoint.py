"""Checkpoints that carry their model card (weights + preprocessing + provenance), torchvision-style.

The card says what the weights are, how inputs must be prepared, what data and recipe made them, how well
they did, and a UUID-derived DICOM UID that the result objects use as the algorithm's device UID.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ccfnet_core import __version__
from ccfnet_core.model import Network, create_model
from ccfnet_core.structures import STRUCTURES

CARD_SCHEMA = 1


def uuid_to_dicom_uid(value: uuid.UUID) -> str:
    """The UUID-derived DICOM UID form (PS3.5 B.2): 2.25.<the UUID as one decimal integer>."""
    return f"2.25.{value.int}"


@dataclass(frozen=True)
class ModelCard:
    """Everything a user of the weights needs besides the tensors themselves."""

    arch: str
    input_size: int
    stride: int
    sigma: float
    version: str
    model_uuid: str
    training_data: str
    intended_use: str
    phantom_only: bool
    structures: tuple[str, ...] = STRUCTURES
    preprocessing: str = (
        "sagittal T2 slices i-1, i, i+1 as 3 channels, each min-max rescaled to [0, 1] (MONOCHROME1 inverted), "
        "resized to input_size x input_size without keeping aspect; no mean/std normalisation"
    )
    outputs: str = "per structure: point (x, y) and P(abnormal): vertebra v2 vs v1; disc v2/v3/v4 vs v1"
    recipe: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    limitations: tuple[str, ...] = ()
    # How outputs are read for a person (calibration, thresholds, grade rule, level check), fitted out of fold
    # (`ccfnet_core.readout.Readout`, `ccfnet fit-readout`); empty: raw probabilities and the 0.5 threshold.
    readout: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    dtype: str = "float32"
    software_version: str = __version__
    created: str = ""
    schema: int = CARD_SCHEMA

    @property
    def device_uid(self) -> str:
        """DICOM UID of this model, for Contributing Equipment / algorithm identification."""
        return uuid_to_dicom_uid(uuid.UUID(self.model_uuid))

    @property
    def display_name(self) -> str:
        return f"CCF-Net {self.arch.upper()}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["structures"] = list(self.structures)
        data["limitations"] = list(self.limitations)
        data["device_uid"] = self.device_uid
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["structures"] = tuple(known.get("structures", STRUCTURES))
        known["limitations"] = tuple(known.get("limitations", ()))
        return cls(**known)


def new_card(**kwargs: Any) -> ModelCard:
    """A card with a fresh UUID and creation time."""
    defaults: dict[str, Any] = {
        "model_uuid": str(uuid.uuid4()),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": __version__,
    }
    defaults.update(kwargs)
    return ModelCard(**defaults)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in key order (stable across save/load, unlike the pickle bytes)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


def source_record(card: ModelCard, path: Path) -> dict[str, object]:
    """What a combined checkpoint (a pair, a graded model) records of each checkpoint it was made from."""
    return {
        "file": path.name,
        "model_uuid": card.model_uuid,
        "weights_sha256": card.weights_sha256,
        "recipe": card.recipe,
        "metrics": {k: v for k, v in card.metrics.items() if k != "per_fold"},
    }


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (missing, corrupt, wrong schema, weights not matching the card)."""


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors as float16, except scalars (a logit share such as 1/3 stays exactly what was asked for)."""
    return {k: v.half() if v.is_floating_point() and v.dim() > 0 else v for k, v in state.items()}


INT8_SCALE_SUFFIX = ".int8_scale"  # beside an int8 weight: its float32 scale per output channel
INT8_MIN_ELEMENTS = 16384  # smaller weights (stems, output convs: 0.7% of a pair's) stay float16


def quantise_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv and linear weights (floating, 2+ dims, `INT8_MIN_ELEMENTS` or more) as int8 with a symmetric float32
    scale per output channel (`<key>.int8_scale`), the rest as `save_model(half=True)` stores it. Why: three
    CCF-Nets fit the 25 MB checkpoint limit (issue 6) only at a byte per weight; per-channel scales keep each
    filter's own range, and the first and last layers, which quantisation hurts most, cost almost nothing kept."""
    out = _half(state)
    for key, value in state.items():
        if value.is_floating_point() and value.dim() >= 2 and value.numel() >= INT8_MIN_ELEMENTS:
            weight = value.float()
            scale = weight.abs().reshape(weight.shape[0], -1).amax(dim=1).clamp_min(1e-12) / 127.0
            out[key] = torch.round(weight / _per_channel(scale, weight)).clamp(-127, 127).to(torch.int8)
            out[key + INT8_SCALE_SUFFIX] = scale
    return out


def _per_channel(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A (C_out,) scale shaped to broadcast over a (C_out, ...) weight."""
    return scale.reshape(-1, *([1] * (weight.dim() - 1)))


def save_model(path: Path, model: nn.Module, card: ModelCard, half: bool = False, int8: bool = False) -> ModelCard:
    """Write weights + card (and nothing else) to `path`; returns the card with sha256 and dtype filled.

    `half` stores the weights and statistics as float16; a scalar setting kept as a buffer (a pair's or an
    ensemble's logit share, such as 1/3) stays float32, so it is exactly what was asked for. `int8` stores the
    conv and linear weights as int8 per output channel (`quantise_int8`) and the rest as `half` does.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if int8:
        state, dtype = quantise_int8(state), "int8"
    elif half:
        state, dtype = _half(state), "float16"
    else:
        dtype = "float32"
    return _write(path, replace(card, weights_sha256=state_dict_sha256(state), dtype=dtype), state)


def _write(path: Path, card: ModelCard, state: dict[str, torch.Tensor]) -> ModelCard:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"card": card.to_dict(), "state_dict": state}, buffer)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return card


def write_card(path: Path, card: ModelCard) -> ModelCard:
    """Rewrite the card of a checkpoint and keep its stored tensors byte for byte (so its digest and dtype)."""
    stored, state = read_checkpoint(path)
    return _write(path, replace(card, weights_sha256=stored.weights_sha256, dtype=stored.dtype), state)


def read_checkpoint(path: Path) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Card and tensors as stored, the weights digest verified; CheckpointError if unusable."""
    card, state = _read(path)
    if card.weights_sha256 and state_dict_sha256(state) != card.weights_sha256:
        raise CheckpointError(f"{path}: weights do not match the sha256 in the model card")
    return card, state


def _read(path: Path) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return ModelCard.from_dict(payload["card"]), payload["state_dict"]
    except (RuntimeError, KeyError, TypeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: not a ccfnet checkpoint ({exc})") from exc


def read_card(path: Path) -> ModelCard:
    """The model card alone, without building the network; CheckpointError as `load_model`."""
    return _read(path)[0]


def float32_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict read from a (possibly float16 or int8) checkpoint with its floating tensors in float32 and its
    int8 weights scaled back (`quantise_int8`), for loading."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(INT8_SCALE_SUFFIX):
            continue
        scale = state.get(key + INT8_SCALE_SUFFIX)
        if scale is not None:
            out[key] = value.float() * _per_channel(scale.float(), value)
        else:
            out[key] = value.float() if value.is_floating_point() else value
    return out


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[Network, ModelCard]:
    """Load weights and card, verify the sha256, return the model in eval mode (float32) on `device`."""
    card, state = read_checkpoint(path)
    model = create_model(card.arch)
    model.load_state_dict(float32_state(state))
    return model.to(device).eval(), card


DEFAULT_MODEL_NAME = "ccfnet-r18msc-loc2-refined-256-tianchi.pt"
PHANTOM_MODEL_NAME = "ccfnet-r18msc-phantom.pt"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def default_model_path() -> Path:
    """The configured default model: $CCFNET_MODEL_PATH, else the shipped Tianchi checkpoint in models/."""
    import os

    configured = os.environ.get("CCFNET_MODEL_PATH", "").strip()
    return Path(configured) if configured else MODELS_DIR / DEFAULT_MODEL_NAME
