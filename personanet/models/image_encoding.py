"""Image encoding: a clean image column (raw HWC bytes) as a float tensor, from the config alone.

The image counterpart of `personanet.models.encoding`. clean leaves an image column
(config ``type = "image"``, ``shape = [H, W, C]``) as ``pl.Binary`` holding exactly
``H * W * C`` uint8 bytes, row-major height, width, channels. `ImageEncoder.transform`
turns it into ``float32 (n, C, H, W)`` scaled to ``[0, 1]`` by the fixed uint8 range
(``x / 255``): no mean or deviation is estimated from the private images, so the
encoder reveals nothing about the people and costs no budget, like the tabular one.

The target is the tabular encoder's (a class index from the config's categories, ``-1``
when null or outside them); a categorical target only, since the CNN classifies.

One image column is the network's input; other feature columns beside it are not used
by the CNN (`from_config` names them: a warning, or a notice for sensitive ones,
which evaluate's per-group figures use). The batch key is ``"image"``.
Saved as ``encoder.json`` beside the model; `from_json` rebuilds it for evaluate,
predict and serve, so they apply exactly the transform the model was trained with.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from personanet.errors import BadInputError, ConfigError
from personanet.models.encoding import _target_spec

if TYPE_CHECKING:
    import polars as pl
    import torch

    from personanet.config import Config

IMAGE_ENCODER_FORMAT = "personanet.image-encoder/1"
#: the batch key the CNN's ``forward`` takes
IMAGE_KEY = "image"

logger = logging.getLogger("personanet")


@dataclass(frozen=True)
class ImageBatch:
    """Model inputs for a frame: ``image`` float32 ``(n, C, H, W)`` in ``[0, 1]``, and the
    target (int64 class indices, ``-1`` = unlabelled; None when the frame has none)."""

    image: np.ndarray
    target: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of rows whose target is usable for training or scoring."""
        if self.target is None:
            return np.zeros(len(self), dtype=bool)
        return self.target >= 0

    def select(self, mask: np.ndarray) -> ImageBatch:
        return ImageBatch(self.image[mask], None if self.target is None else self.target[mask])

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``{"image", "target"}`` as torch tensors on `device` (target only when present)."""
        import torch

        out = {IMAGE_KEY: torch.as_tensor(self.image, device=device)}
        if self.target is not None:
            out["target"] = torch.as_tensor(self.target, device=device)
        return out


@functools.lru_cache(maxsize=16)
def _warn_unused(image: str, others: tuple[str, ...], sensitive: tuple[str, ...]) -> None:
    """Once per process and columns: train builds the encoder more than once.

    A sensitive column beside an image is what evaluate's per-group figures need (the
    bundled forms' age and gender): said plainly, not warned of. Any other feature the
    cnn leaves unread is likely a column its author expected it to use: a warning.
    """
    if others:
        logger.warning("the cnn model reads only the image column %r: feature column(s) %s "
                       "are not used (set role = \"ignore\" on them to silence this)",
                       image, ", ".join(others))
    if sensitive:
        logger.info("the cnn model reads the image column %r only; sensitive column(s) %s "
                    "are not inputs, evaluate reports accuracy per group of them",
                    image, ", ".join(sensitive))


class ImageEncoder:
    """The public transform from a clean frame's image column to ``(n, C, H, W)`` floats."""

    def __init__(self, *, image: dict[str, Any], target: dict[str, Any]) -> None:
        shape = [int(s) for s in image["shape"]]
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"columns.{image['name']}.shape must be [height, width, "
                              "channels], all positive")
        if target.get("task") == "regression":
            raise ConfigError(f"columns.{target['name']}: the image model classifies; give "
                              "the target categories")
        self.image = {"name": str(image["name"]), "shape": shape}
        self.target = target

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: Config) -> ImageEncoder:
        """Build from the config's image column and target (no data is read).

        Raises:
            ConfigError: no image feature, or more than one.
        """
        images = [c for c in config.features() if c.kind == "image"]
        if len(images) != 1:
            raise ConfigError(f"the cnn model takes exactly one image feature column; the "
                              f"config has {len(images)}: set role = \"ignore\" on the others")
        unread = [c for c in config.features() if c.kind != "image"]
        if unread:
            _warn_unused(images[0].name, tuple(c.name for c in unread if not c.sensitive),
                         tuple(c.name for c in unread if c.sensitive))
        shape = getattr(images[0], "shape", None)
        if shape is None:
            raise ConfigError(f"columns.{images[0].name} needs shape = [height, width, "
                              "channels]")
        return cls(image={"name": images[0].name, "shape": list(shape)},
                   target=_target_spec(config.target_column))

    def to_json(self) -> dict[str, Any]:
        return {"format": IMAGE_ENCODER_FORMAT, "image": self.image, "target": self.target,
                "scale": "x / 255"}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ImageEncoder:
        if not isinstance(value, dict) or value.get("format") != IMAGE_ENCODER_FORMAT:
            raise BadInputError("not a personanet image encoder (expected format "
                                f"{IMAGE_ENCODER_FORMAT!r})")
        try:
            return cls(image=dict(value["image"]), target=dict(value["target"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"image encoder JSON is incomplete: {exc}") from exc

    # ------------------------------------------------------------ description

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of every image."""
        h, w, c = self.image["shape"]
        return int(h), int(w), int(c)

    @property
    def task(self) -> str:
        return str(self.target["task"])

    @property
    def target_name(self) -> str:
        return str(self.target["name"])

    @property
    def target_classes(self) -> list[str]:
        return list(self.target.get("classes", []))

    @property
    def n_outputs(self) -> int:
        return 1 if self.task == "binary" else len(self.target_classes)

    @property
    def columns(self) -> list[str]:
        return [self.image["name"]]

    # ------------------------------------------------------------ transform

    def transform(self, frame: pl.DataFrame) -> ImageBatch:
        """Decode the image column's raw bytes; extra columns are ignored.

        Raises:
            BadInputError: the column is absent, or a value is null or not ``H*W*C`` bytes
                (clean quarantines such rows, so this means the frame skipped clean).
        """
        # No polars import here: frames meet tensors in the stages only; Series methods do.
        name = self.image["name"]
        if name not in frame.columns:
            raise BadInputError(f"input has no column {name!r}, which the model needs")
        h, w, c = self.shape
        size = h * w * c
        column = frame.get_column(name)
        if str(column.dtype) != "Binary":
            raise BadInputError(f"column {name!r} is {column.dtype}, not image bytes: was the "
                                "frame cleaned?")
        lengths = column.bin.size().fill_null(-1).to_numpy() if frame.height else np.zeros(0)
        bad = np.flatnonzero(lengths != size)
        if bad.size:
            raise BadInputError(f"column {name!r}: row {int(bad[0])} holds {int(lengths[bad[0]])} "
                                f"bytes, not the {size} of a {h}x{w}x{c} image")
        raw = np.frombuffer(b"".join(column.to_list()), dtype=np.uint8)
        pixels = raw.reshape(frame.height, h, w, c).transpose(0, 3, 1, 2)
        image = np.ascontiguousarray(pixels, dtype=np.float32) / np.float32(255.0)
        target = None
        if self.target_name in frame.columns:
            mapping = {k: i for i, k in enumerate(self.target_classes)}
            values = frame.get_column(self.target_name).to_list()
            target = np.asarray([-1 if v is None else mapping.get(str(v), -1) for v in values],
                                dtype=np.int64)
        return ImageBatch(image, target)

    def unscale_target(self, values: np.ndarray) -> np.ndarray:
        raise ValueError("unscale_target applies to regression targets only")
