"""The registry of model families: what the rest of the code may know about a network.

A model family is one module plus a `register_family` call (Opacus registers its grad
samplers the same way): `personanet.models.tabular` registers "tabular", the MLP for
tabular records, and `personanet.models.cnn` "cnn", the CNN for one image per person
(`family_name_for` picks one from ``train.model``). Training, evaluation and prediction
reach a network only through its `ModelFamily`, so none of them knows which family it
serves:

- batches are mappings of named tensors (`EncodedBatch.tensors`), and a network is
  called as ``model(**family.inputs(batch))``, the targets read as ``batch["target"]``;
- a family's network also has ``predict(**inputs)``: class probabilities ``(n, K)``,
  or the scaled regression value ``(n,)``;
- a trained model is a folder of files the family writes (`save`) and reads back
  without unpickling anything (`load`); its ``model.json`` names the family, and one
  that names none was written before there were families: "tabular".

This module imports neither torch nor a family until one is asked for, so the CLI's
``--help`` stays fast.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet.errors import BadInputError, InputMissingError

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
    import torch
    from torch import nn

    from personanet.config import Config, TrainConfig
    from personanet.models.encoding import Encoder

#: the family of a model.json that names none (written before families existed)
DEFAULT_FAMILY = "tabular"
#: the description every family writes beside its weights
SPEC_FILE = "model.json"
#: the weights (safetensors) and the encoder (JSON) every family writes
MODEL_FILE = "model.safetensors"
ENCODER_FILE = "encoder.json"

#: families shipped with personanet, imported (hence registered) on first use
_BUILTIN = {"tabular": "personanet.models.tabular", "cnn": "personanet.models.cnn"}
_FAMILIES: dict[str, ModelFamily] = {}


@dataclass(frozen=True)
class ModelFamily:
    """One kind of network: how it is sized, built, trained against, saved and loaded.

    Attributes:
        name: the family's name, written in model.json (the default family omits it).
        input_names: the batch keys the network's ``forward`` takes, as keywords.
        spec_for: ``(encoder, train config) -> spec``: the JSON-able architecture for
            the encoder's inputs and target; the initial weights are not in it.
        build: ``spec -> network``, untrained, on the CPU.
        save: ``(network, spec, encoder, folder) -> file names`` written into `folder`.
        load: ``folder -> (network, encoder)``, on the CPU, in eval mode.
        loss: ``(task, *, reduction) -> criterion``; ``reduction="none"`` gives one loss
            per example, the shape per-example clipping needs.
        resolve_auto: the family's "auto" [train] settings from the number of rows.
        encoder_for: ``config -> encoder`` from the public config alone (None: the
            tabular `Encoder.from_config`); an encoder has ``transform(frame)`` giving a
            batch with ``tensors()``, ``labelled``, ``select``, and the target's
            ``task`` and ``target_classes``.
    """

    name: str
    input_names: tuple[str, ...]
    spec_for: Callable[[Encoder, TrainConfig], dict[str, Any]]
    build: Callable[[dict[str, Any]], nn.Module]
    save: Callable[[nn.Module, dict[str, Any], Encoder, Path], list[str]]
    load: Callable[[Path], tuple[nn.Module, Encoder]]
    loss: Callable[..., nn.Module]
    encoder_for: Callable[[Config], Any] | None = None
    #: ``(train config, *, n_train_rows) -> (resolved, chosen)``: the family's "auto"
    #: settings (None: `personanet.training.defaults.resolve_train_config`)
    resolve_auto: Callable[..., tuple[TrainConfig, dict[str, Any]]] | None = None

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keyword arguments of ``forward`` for a batch: ``model(**family.inputs(batch))``."""
        return {name: batch[name] for name in self.input_names}

    def encoder(self, config: Config) -> Any:
        """The family's encoder for `config`, built from the public config alone."""
        if self.encoder_for is not None:
            return self.encoder_for(config)
        from personanet.models.encoding import Encoder

        return Encoder.from_config(config)


def family_name_for(config: Config) -> str:
    """``train.model``, with "auto" resolved: "cnn" when a feature column is an image,
    else "tabular"."""
    chosen = str(getattr(config.train, "model", "auto"))
    if chosen != "auto":
        return chosen
    return "cnn" if any(c.kind == "image" for c in config.features()) else DEFAULT_FAMILY


def register_family(family: ModelFamily) -> ModelFamily:
    """Make `family` known by its name (a second registration replaces the first)."""
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    """The family registered as `name`, importing a built-in one on first use.

    Raises:
        BadInputError: no family has that name (a model from a newer personanet?).
    """
    if name not in _FAMILIES and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted({*_FAMILIES, *_BUILTIN}))
        raise BadInputError(f"unknown model family {name!r} (known: {known})") from None


def family_of_spec(spec: Mapping[str, Any]) -> ModelFamily:
    """The family a model.json describes."""
    return get_family(str(spec.get("family", DEFAULT_FAMILY)))


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a network, whatever Opacus wrapper it is in."""
    inner = getattr(model, "_module", model)
    return get_family(str(getattr(inner, "family_name", DEFAULT_FAMILY)))


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain weights, whatever Opacus wrapper `model` is in, on the CPU, contiguous
    (what safetensors writes); the key names are the network's own."""
    inner = getattr(model, "_module", model)
    return {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}


def write_model_files(model: nn.Module, spec: dict[str, Any], encoder: Any, folder: Path, *,
                      weights_format: str) -> list[str]:
    """Write the files every family's `save` writes: the weights (safetensors, tagged
    with the family's `weights_format`), ``model.json`` and ``encoder.json``; returns
    their names."""
    from safetensors.torch import save_file

    save_file(state_dict_for_saving(model), str(folder / MODEL_FILE),
              metadata={"format": weights_format})
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    (folder / ENCODER_FILE).write_text(json.dumps(encoder.to_json(), indent=2, sort_keys=True)
                                       + "\n")
    return [MODEL_FILE, SPEC_FILE, ENCODER_FILE]


def load_model(artifact_dir: Path | str) -> tuple[nn.Module, Encoder]:
    """The trained network (CPU, eval mode) and its encoder, from a train artifact folder,
    whichever family wrote it. Reads JSON and safetensors only: nothing is unpickled.

    Raises:
        InputMissingError: the folder has no model.json.
        BadInputError: model.json is unreadable or names an unknown family.
    """
    folder = Path(artifact_dir)
    if not (folder / SPEC_FILE).is_file():
        raise InputMissingError(f"{folder} has no {SPEC_FILE}: is it a train artifact?")
    try:
        spec = json.loads((folder / SPEC_FILE).read_text("utf-8"))
    except ValueError as exc:
        raise BadInputError(f"{folder}: unreadable model description: {exc}") from exc
    if not isinstance(spec, dict):
        raise BadInputError(f"{folder / SPEC_FILE} is not a model description")
    return family_of_spec(spec).load(folder)


def predict_frame(model: nn.Module, encoder: Encoder, frame: pl.DataFrame, *,
                  batch_size: int = 8192) -> np.ndarray:
    """Score a clean-schema frame in batches, with any family's network.

    Returns class probabilities ``(n, K)`` in `encoder.target_classes` order, or
    regression predictions ``(n,)`` in the target's own units.
    """
    import numpy as np

    family = family_of(model)
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, frame.height, batch_size):
        batch = encoder.transform(frame.slice(start, batch_size)).tensors(device)
        outputs.append(model.predict(**family.inputs(batch)).cpu().numpy())
    if not outputs:
        width = (len(encoder.target_classes),) if encoder.task != "regression" else ()
        return np.zeros((0, *width), dtype=np.float32)
    result = np.concatenate(outputs)
    return encoder.unscale_target(result) if encoder.task == "regression" else result
