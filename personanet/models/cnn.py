"""The "cnn" model family: a small convolutional network for one image per person.

Two presets (``train.preset``), both in one `ImageCNN` built from a JSON spec:

- ``"seed"``: exactly the network of the product's founding document (a Keras
  ``Sequential``): Conv2D 32 3x3 relu, MaxPool 2, Conv2D 64 3x3 relu, MaxPool 2,
  Flatten, Dense 128 relu, Dense K (the softmax is in the loss);
- ``"tanh"``: the standard DP-MNIST network (Papernot et al., "Tempered Sigmoid
  Activations for Deep Learning with Differential Privacy", 2021; Tramer and Boneh,
  "Differentially Private Learning Needs Better Features", 2021): conv 16 8x8 stride 2
  pad 3, maxpool 2 stride 1, conv 32 4x4 stride 2, maxpool 2 stride 1, dense 32,
  dense K, with ``train.activation`` (tanh by default: bounded activations keep
  per-example gradient norms small, so clipping loses less signal).

``"auto"`` is ``"tanh"``, the preset measured better under DP and without it
(`benchmarks/bench_forms.py`, docs/training.md "Images"). ``train.norm = "groupnorm"``
puts a GroupNorm after each convolution (per example: allowed under DP);
``"batchnorm"`` a BatchNorm, which mixes the examples of a batch, so that no example's
gradient is its own: `train` refuses it under DP (exit 78) and allows it with
``--no-dp`` only.

A trained model is ``model.safetensors`` + ``model.json`` (the spec, naming the family)
+ ``encoder.json`` (`personanet.models.image_encoding.ImageEncoder`); nothing pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from personanet.errors import BadInputError, ConfigError, InputMissingError
from personanet.models import (
    ENCODER_FILE,
    MODEL_FILE,
    SPEC_FILE,
    ModelFamily,
    register_family,
    write_model_files,
)
from personanet.models.image_encoding import IMAGE_KEY, ImageEncoder
from personanet.models.tabular import PersonaLoss, _activation
from personanet.training.image_defaults import resolve_image_train_config

if TYPE_CHECKING:
    from personanet.config import TrainConfig

CNN_FORMAT = "personanet.cnn/1"
PRESETS = ("seed", "tanh")
#: what ``train.preset = "auto"`` means (measured: docs/training.md "Images")
DEFAULT_PRESET = "tanh"
NORMS = ("none", "groupnorm", "batchnorm")


def _conv_norm(norm: str, channels: int) -> list[nn.Module]:
    if norm == "none":
        return []
    if norm == "groupnorm":
        return [nn.GroupNorm(min(16, channels), channels)]
    if norm == "batchnorm":
        return [nn.BatchNorm2d(channels)]
    raise ValueError(f"the cnn family has no norm {norm!r} (known: {', '.join(NORMS)})")


def _layers(preset: str, channels: int, activation: str, norm: str) -> list[nn.Module]:
    """The convolutional part of a preset, up to and including Flatten."""
    if preset == "seed":
        return [nn.Conv2d(channels, 32, 3), *_conv_norm(norm, 32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3), *_conv_norm(norm, 64), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten()]
    if preset == "tanh":
        return [nn.Conv2d(channels, 16, 8, stride=2, padding=3), *_conv_norm(norm, 16),
                _activation(activation), nn.MaxPool2d(2, 1),
                nn.Conv2d(16, 32, 4, stride=2), *_conv_norm(norm, 32),
                _activation(activation), nn.MaxPool2d(2, 1), nn.Flatten()]
    raise ValueError(f"unknown cnn preset {preset!r} (known: {', '.join(PRESETS)})")


class ImageCNN(nn.Module):
    """The network; `forward(image)` takes ``(n, C, H, W)`` floats and returns logits
    (``(n, 1)`` binary, ``(n, K)`` multi-class)."""

    family_name: ClassVar[str] = "cnn"

    def __init__(self, *, preset: str, shape: list[int], n_outputs: int, task: str,
                 activation: str = "tanh", norm: str = "none") -> None:
        super().__init__()
        if task not in ("binary", "multiclass"):
            raise ValueError(f"the cnn family classifies; task {task!r} is not supported")
        height, width, channels = (int(s) for s in shape)
        self._spec = {"format": CNN_FORMAT, "family": "cnn", "preset": preset,
                      "shape": [height, width, channels], "n_outputs": int(n_outputs),
                      "task": task, "activation": activation, "norm": norm}
        self.features = nn.Sequential(*_layers(preset, channels, activation, norm))
        with torch.no_grad():
            flat = int(self.features(torch.zeros(1, channels, height, width)).shape[1])
        hidden = 128 if preset == "seed" else 32
        act = nn.ReLU() if preset == "seed" else _activation(activation)
        self.head = nn.Sequential(nn.Linear(flat, hidden), act, nn.Linear(hidden, n_outputs))

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ImageCNN:
        if not isinstance(spec, dict) or spec.get("format") != CNN_FORMAT:
            raise BadInputError(f"not a personanet cnn spec (expected format {CNN_FORMAT!r})")
        keys = ("preset", "shape", "n_outputs", "task", "activation", "norm")
        try:
            return cls(**{k: spec[k] for k in keys})
        except KeyError as exc:
            raise BadInputError(f"cnn spec lacks {exc}") from exc
        except ValueError as exc:
            raise BadInputError(f"cnn spec: {exc}") from exc

    @staticmethod
    def spec_for(encoder: ImageEncoder, train: TrainConfig) -> dict[str, Any]:
        """The architecture for an image encoder and `[train]` (preset, activation, norm).

        Raises:
            ConfigError: a norm the family has no layer for.
        """
        preset = getattr(train, "preset", "auto")
        preset = DEFAULT_PRESET if preset == "auto" else preset
        if preset not in PRESETS:
            raise ConfigError(f"train.preset = {preset!r} is not a cnn preset (known: auto, "
                              f"{', '.join(PRESETS)})")
        if train.norm not in NORMS:
            raise ConfigError(f"train.norm = {train.norm!r} is not available to the cnn model "
                              f"(known: {', '.join(NORMS)})")
        return {"format": CNN_FORMAT, "family": "cnn", "preset": preset,
                "shape": list(encoder.shape), "n_outputs": encoder.n_outputs,
                "task": encoder.task, "activation": train.activation, "norm": train.norm}

    @property
    def spec(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._spec))

    @property
    def task(self) -> str:
        return str(self._spec["task"])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(n, K)`` (binary: ``[P(class 0), P(class 1)]``)."""
        out = self(image)
        if self.task == "binary":
            p = torch.sigmoid(out[:, 0])
            return torch.stack([1 - p, p], dim=1)
        return torch.softmax(out, dim=1)


def save_cnn(model: nn.Module, spec: dict[str, Any], encoder: ImageEncoder, folder: Path
             ) -> list[str]:
    """Write ``model.safetensors``, ``model.json``, ``encoder.json``; returns the file names."""
    return write_model_files(model, spec, encoder, folder, weights_format=CNN_FORMAT)


def load_cnn(artifact_dir: Path | str) -> tuple[ImageCNN, ImageEncoder]:
    """The trained network (CPU, eval mode) and its encoder; safetensors and JSON only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(artifact_dir)
    for name in (MODEL_FILE, SPEC_FILE, ENCODER_FILE):
        if not (folder / name).is_file():
            raise InputMissingError(f"{folder} has no {name}: is it a train artifact?")
    try:
        spec = json.loads((folder / SPEC_FILE).read_text("utf-8"))
        encoder = ImageEncoder.from_json(json.loads((folder / ENCODER_FILE).read_text("utf-8")))
    except ValueError as exc:
        raise BadInputError(f"{folder}: unreadable model description: {exc}") from exc
    model = ImageCNN.from_spec(spec)
    try:
        weights = load_file(str(folder / MODEL_FILE))
        model.load_state_dict(weights, strict=True)
    except (SafetensorError, OSError) as exc:
        raise BadInputError(f"{folder / MODEL_FILE}: unreadable weights: {exc}") from exc
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BadInputError(f"{folder / MODEL_FILE} does not match model.json: {first}") from exc
    model.eval()
    return model, encoder


CNN = register_family(ModelFamily(
    name="cnn", input_names=(IMAGE_KEY,), spec_for=ImageCNN.spec_for,  # type: ignore[arg-type]
    build=ImageCNN.from_spec, save=save_cnn, load=load_cnn,  # type: ignore[arg-type]
    loss=PersonaLoss, encoder_for=ImageEncoder.from_config,
    resolve_auto=resolve_image_train_config))
