"""The "tabular" model family: PersonaNet, a small MLP for personal records, shaped for DP-SGD.

Categorical columns enter the first layer one-hot (default) or as learned
embeddings, concatenated with the scaled numeric features; then an MLP with a
bounded activation (tanh by default) and an output layer sized for the task:
one logit for a binary target, one per class for multi-class, one value for
regression. Choices that matter under DP:

- bounded activations (tanh, tempered sigmoid) keep activations, hence
  per-example gradient norms, from exploding, so clipping throws away less
  signal (Papernot et al., "Tempered Sigmoid Activations for Deep Learning
  with Differential Privacy", 2021);
- no BatchNorm, ever: it mixes examples within a batch, which breaks
  per-example clipping; LayerNorm/GroupNorm are per-example and allowed;
- every layer is an `nn.Linear` or `nn.Embedding` in the default shape, the
  layers for which Opacus computes per-example gradient norms without
  materialising per-example gradients (ghost clipping).

A trained model is ``model.safetensors`` + ``model.json`` (this `spec`) +
``encoder.json``; `load_persona_net` reads them back without unpickling anything.
The module registers the family "tabular" (`personanet.models`), which is how
training, evaluation and prediction reach it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from personanet.errors import BadInputError, InputMissingError
from personanet.models import (
    ENCODER_FILE,
    MODEL_FILE,
    SPEC_FILE,
    ModelFamily,
    register_family,
    write_model_files,
)
from personanet.models.encoding import Encoder
from personanet.training.defaults import settled

if TYPE_CHECKING:
    from personanet.config import TrainConfig

MODEL_FORMAT = "personanet.model/1"
TASKS = ("binary", "multiclass", "regression")

#: tempered sigmoid s * sigmoid(T x) - o; the CIFAR-10 values of Papernot et al. (2021)
TEMPERED_SIGMOID = {"scale": 1.58, "temperature": 3.0, "offset": 1.0}


class TemperedSigmoid(nn.Module):
    """``scale * sigmoid(temperature * x) - offset``: a bounded activation family."""

    def __init__(self, scale: float, temperature: float, offset: float) -> None:
        super().__init__()
        self.scale, self.temperature, self.offset = scale, temperature, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(self.temperature * x) - self.offset


def _activation(name: str) -> nn.Module:
    if name == "tanh":
        return nn.Tanh()
    if name == "tempered_sigmoid":
        return TemperedSigmoid(**TEMPERED_SIGMOID)
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}")


def _norm(name: str, width: int) -> nn.Module | None:
    if name == "none":
        return None
    if name == "layernorm":
        return nn.LayerNorm(width)
    if name == "groupnorm":
        groups = max(g for g in (8, 4, 2, 1) if width % g == 0)
        return nn.GroupNorm(groups, width)
    raise ValueError(f"unknown norm {name!r} (BatchNorm is never used: it breaks DP)")


class PersonaNet(nn.Module):
    """The network; build it with `from_spec` (or `spec_for`) so it can be saved and reloaded.

    `forward(categorical, numeric)` takes the int64 index matrix and the float
    feature matrix of an `EncodedBatch` and returns raw outputs: logits for
    classification (``(n, 1)`` binary, ``(n, K)`` multi-class) or the scaled
    regression value ``(n, 1)``.
    """

    #: how `personanet.models.family_of` finds this network's family
    family_name: ClassVar[str] = "tabular"

    def __init__(self, *, cardinalities: list[int], n_numeric: int, n_outputs: int, task: str,
                 hidden_sizes: list[int], activation: str = "tanh", norm: str = "none",
                 dropout: float = 0.0, categorical_encoding: str = "onehot",
                 embedding_dim: int = 8) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        if categorical_encoding not in ("onehot", "embedding"):
            raise ValueError(f"unknown categorical_encoding {categorical_encoding!r}")
        self._spec = {
            "format": MODEL_FORMAT, "cardinalities": [int(c) for c in cardinalities],
            "n_numeric": int(n_numeric), "n_outputs": int(n_outputs), "task": task,
            "hidden_sizes": [int(h) for h in hidden_sizes], "activation": activation,
            "norm": norm, "dropout": float(dropout),
            "categorical_encoding": categorical_encoding, "embedding_dim": int(embedding_dim),
        }
        if activation == "tempered_sigmoid":
            self._spec["tempered_sigmoid"] = dict(TEMPERED_SIGMOID)
        self.onehot = categorical_encoding == "onehot"
        offsets = np.concatenate([[0], np.cumsum(cardinalities)[:-1]]) if cardinalities else []
        # A buffer would be rejected by Opacus' validator; a plain tensor attribute is not
        # state, and is rebuilt from the spec on load (one copy per device it meets).
        self._offsets = {torch.device("cpu"): torch.as_tensor(np.asarray(offsets,
                                                                          dtype=np.int64))}
        self._onehot_width = int(sum(cardinalities))
        if self.onehot:
            self.embeddings = nn.ModuleList()
            width = self._onehot_width + n_numeric
        else:
            self.embeddings = nn.ModuleList(nn.Embedding(c, embedding_dim) for c in cardinalities)
            width = embedding_dim * len(cardinalities) + n_numeric
        if width == 0:
            raise ValueError("the model has no input features")
        layers: list[nn.Module] = []
        for size in hidden_sizes:
            layers.append(nn.Linear(width, size))
            norm_layer = _norm(norm, size)
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.hidden = nn.Sequential(*layers)
        self.output = nn.Linear(width, n_outputs)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> PersonaNet:
        if not isinstance(spec, dict) or spec.get("format") != MODEL_FORMAT:
            raise BadInputError(f"not a personanet model spec (expected format {MODEL_FORMAT!r})")
        keys = ("cardinalities", "n_numeric", "n_outputs", "task", "hidden_sizes", "activation",
                "norm", "dropout", "categorical_encoding", "embedding_dim")
        try:
            return cls(**{k: spec[k] for k in keys})
        except KeyError as exc:
            raise BadInputError(f"model spec lacks {exc}") from exc

    @classmethod
    def spec_for(cls, encoder: Encoder, train: TrainConfig) -> dict[str, Any]:
        """The architecture for an encoder's inputs and target, sized by `[train]`."""
        return {
            "format": MODEL_FORMAT, "cardinalities": encoder.cardinalities,
            "n_numeric": encoder.n_numeric, "n_outputs": encoder.n_outputs,
            "task": encoder.task, "hidden_sizes": list(settled(train).hidden_sizes),
            "activation": train.activation, "norm": train.norm, "dropout": train.dropout,
            "categorical_encoding": train.categorical_encoding,
            "embedding_dim": train.embedding_dim,
        }

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able architecture: enough to rebuild the network before loading weights."""
        return json.loads(json.dumps(self._spec))

    @property
    def task(self) -> str:
        return str(self._spec["task"])

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        if self._onehot_width:
            if self.onehot:
                offsets = self._offsets.get(categorical.device)
                if offsets is None:
                    offsets = self._offsets[torch.device("cpu")].to(categorical.device)
                    self._offsets[categorical.device] = offsets
                index = categorical + offsets
                hot = torch.zeros(categorical.shape[0], self._onehot_width,
                                  dtype=numeric.dtype, device=numeric.device)
                parts.append(hot.scatter_(1, index, 1.0))
            else:
                parts.extend(emb(categorical[:, i]) for i, emb in enumerate(self.embeddings))
        if numeric.shape[1]:
            parts.append(numeric)
        inputs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.output(self.hidden(inputs))

    @torch.no_grad()
    def predict(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(n, K)`` (binary: ``[P(class 0), P(class 1)]``) or the
        scaled regression value ``(n,)``."""
        out = self(categorical, numeric)
        if self.task == "binary":
            p = torch.sigmoid(out[:, 0])
            return torch.stack([1 - p, p], dim=1)
        if self.task == "multiclass":
            return torch.softmax(out, dim=1)
        return out[:, 0]


class PersonaLoss(nn.Module):
    """The loss for a task, per example: BCE-with-logits, cross-entropy or squared error.

    It returns one value per example when ``reduction == "none"``, the shape
    Opacus' ghost clipping needs, and the mean or sum otherwise.
    """

    def __init__(self, task: str, reduction: str = "mean") -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        self.task = task
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "binary":
            loss = F.binary_cross_entropy_with_logits(output[:, 0], target.to(output.dtype),
                                                      reduction="none")
        elif self.task == "multiclass":
            loss = F.cross_entropy(output, target, reduction="none")
        else:
            loss = F.mse_loss(output[:, 0], target.to(output.dtype), reduction="none")
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


def save_model(model: nn.Module, spec: dict[str, Any], encoder: Encoder, folder: Path
               ) -> list[str]:
    """Write ``model.safetensors``, ``model.json``, ``encoder.json``; returns the file names."""
    return write_model_files(model, spec, encoder, folder, weights_format=MODEL_FORMAT)


def load_persona_net(artifact_dir: Path | str) -> tuple[PersonaNet, Encoder]:
    """The trained network (CPU, eval mode) and its encoder, from a train artifact folder.

    Reads safetensors and JSON only: nothing is unpickled.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(artifact_dir)
    for name in (MODEL_FILE, SPEC_FILE, ENCODER_FILE):
        if not (folder / name).is_file():
            raise InputMissingError(f"{folder} has no {name}: is it a train artifact?")
    try:
        spec = json.loads((folder / SPEC_FILE).read_text("utf-8"))
        encoder = Encoder.from_json(json.loads((folder / ENCODER_FILE).read_text("utf-8")))
    except ValueError as exc:
        raise BadInputError(f"{folder}: unreadable model description: {exc}") from exc
    model = PersonaNet.from_spec(spec)
    try:
        weights = load_file(str(folder / MODEL_FILE))
    except (SafetensorError, OSError) as exc:
        raise BadInputError(f"{folder / MODEL_FILE}: unreadable weights: {exc}") from exc
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BadInputError(f"{folder / MODEL_FILE} does not match model.json: {first}") from exc
    model.eval()
    return model, encoder


TABULAR = register_family(ModelFamily(
    name="tabular", input_names=("categorical", "numeric"), spec_for=PersonaNet.spec_for,
    build=PersonaNet.from_spec, save=save_model, load=load_persona_net, loss=PersonaLoss))
