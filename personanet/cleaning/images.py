"""Image values: what an image column's bytes must decode to before a model sees them.

collect stores each image as the bytes of its file (`personanet.sources.images`);
clean and predict decode them here with Pillow (PNG, JPEG) or numpy (NPY, never a
pickle), batch by batch, and keep an image only when it is exactly what the column's
`shape = [height, width, channels]` promises, after its `resize` policy:

- `"refuse"` (default): another size is quarantined (`wrong_size`);
- `"fit"`: resized to height x width (Lanczos; the aspect ratio is not kept);
- `"pad"`: centred on a zero (black) canvas; larger than the shape is `wrong_size`.

Values are 8-bit only: a 16-bit PNG, a float or 16-bit NPY is `not_8bit` (scaling
it down would be a guess about its range). Modes are not converted: a grey column
takes mode L (and 1-bit images, which are 0/255 in L losslessly), an RGB column
takes RGB; RGBA, LA, P (palette), CMYK or grey-for-RGB are `wrong_mode`, since a
colour image where grey was promised is more likely the wrong file than one to
convert. A constant image (every pixel equal: blank, or a failed scan) is
`constant_image`. A photo's EXIF orientation is applied (the image as a viewer shows
it) before its size is judged.

The kept value is `height * width * channels` uint8 bytes, row-major HWC, no header:
`numpy.frombuffer(value, numpy.uint8).reshape(height, width, channels)`.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from personanet.cleaning.values import (
    CONSTANT_IMAGE,
    EMPTY_IMAGE,
    MISSING_VALUE,
    NOT_8BIT,
    TRUNCATED_IMAGE,
    UNDECODABLE_IMAGE,
    WRONG_MODE,
    WRONG_SIZE,
    work_column,
)
from personanet.sources.images import status_column

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

    from personanet.config import ColumnConfig

#: images with more pixels than this are refused before decoding (a decompression bomb)
MAX_SOURCE_PIXELS = 8192 * 8192
#: images decoded per batch: Python objects of one batch at a time, whatever the column's size
DECODE_BATCH_ROWS = 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
_MODES = {1: "L", 3: "RGB"}
_EXIF_ORIENTATION = 0x0112


class _Refused(Exception):
    """An image that may not reach a model; its argument is the quarantine reason."""


def decoded_columns(raw: pl.DataFrame, columns: list[ColumnConfig]) -> list[pl.Series]:
    """Per image column, its pixels and its reason as the work columns the column rule reads
    (`work_column("pixels", name)`, `work_column("image_reason", name)`)."""
    out = []
    for col in columns:
        status = raw.get_column(status_column(col.name), default=None)
        pixels, reasons = decode_column(raw[col.name], status, col)
        out += [pixels.alias(work_column("pixels", col.name)),
                reasons.alias(work_column("image_reason", col.name))]
    return out


def decode_column(values: pl.Series, status: pl.Series | None, col: ColumnConfig
                  ) -> tuple[pl.Series, pl.Series]:
    """Each row's pixels (Binary, H*W*C bytes) or null, and its quarantine reason or null.

    `values` is the image column as collect stored it (the file's bytes), `status` the
    reason collect gave for null bytes (missing file, path outside the folder ...).
    """
    import polars as pl

    if values.dtype != pl.Binary:
        # Text where bytes belong (records not read as images): nothing to decode.
        values = values.cast(pl.String).cast(pl.Binary)
    pixel_parts = [pl.Series(col.name, [], dtype=pl.Binary)]
    reason_parts = [pl.Series(col.name, [], dtype=pl.String)]
    for start in range(0, values.len(), DECODE_BATCH_ROWS):
        chunk = values.slice(start, DECODE_BATCH_ROWS).to_list()
        known = (status.slice(start, DECODE_BATCH_ROWS).to_list() if status is not None
                 else [None] * len(chunk))
        pixels: list[bytes | None] = []
        reasons: list[str | None] = []
        for data, problem in zip(chunk, known, strict=True):
            if problem is not None or data is None:
                pixels.append(None)
                reasons.append(problem or MISSING_VALUE)
                continue
            try:
                pixels.append(decode_image(data, col))
                reasons.append(None)
            except _Refused as refused:
                pixels.append(None)
                reasons.append(str(refused))
        pixel_parts.append(pl.Series(col.name, pixels, dtype=pl.Binary))
        reason_parts.append(pl.Series(col.name, reasons, dtype=pl.String))
    return pl.concat(pixel_parts, rechunk=True), pl.concat(reason_parts, rechunk=True)


def decode_image(data: bytes, col: ColumnConfig) -> bytes:
    """One image's pixels as the column promises them; `_Refused(reason)` otherwise."""
    import numpy as np

    assert col.shape is not None
    height, width, channels = col.shape
    if not data:
        raise _Refused(EMPTY_IMAGE)
    if data.startswith(_NPY_MAGIC):
        array = _resized(_from_npy(data, channels), col)
    else:
        array = _resized(_from_pillow(data, channels), col)
    if array.shape[:2] != (height, width):
        raise _Refused(WRONG_SIZE)
    if array.min() == array.max():
        raise _Refused(CONSTANT_IMAGE)
    return np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _from_pillow(data: bytes, channels: int) -> object:
    """A Pillow image, opened (header read, not yet decoded) and checked for depth and mode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
    except Image.DecompressionBombError:
        raise _Refused(WRONG_SIZE) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise _Refused(UNDECODABLE_IMAGE) from None
    # Pillow reads a 16-bit RGB PNG as 8-bit RGB: the PNG header's bit depth says the truth.
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F") or (
            data.startswith(_PNG_SIGNATURE) and len(data) > 24 and data[24] == 16):
        raise _Refused(NOT_8BIT)
    if image.width * image.height > MAX_SOURCE_PIXELS:
        raise _Refused(WRONG_SIZE)
    if image.mode == "1":
        image = _loaded(image).convert("L")
    if image.mode != _MODES[channels]:
        raise _Refused(WRONG_MODE)
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError):
        orientation = 1
    if orientation != 1:
        # A camera's JPEG says how it must be turned to stand upright: shown as seen.
        from PIL import ImageOps

        image = ImageOps.exif_transpose(_loaded(image))
    return image


def _loaded(image: object) -> object:
    try:
        image.load()  # type: ignore[attr-defined]
    except OSError as exc:
        raise _Refused(TRUNCATED_IMAGE if "truncated" in str(exc) else UNDECODABLE_IMAGE
                       ) from None
    except (ValueError, SyntaxError, EOFError):
        raise _Refused(UNDECODABLE_IMAGE) from None
    return image


def _from_npy(data: bytes, channels: int) -> np.ndarray:
    import numpy as np

    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise _Refused(UNDECODABLE_IMAGE) from None
    if not isinstance(array, np.ndarray):
        raise _Refused(UNDECODABLE_IMAGE)
    if array.dtype != np.uint8:
        raise _Refused(NOT_8BIT if array.dtype.kind in "uif" else UNDECODABLE_IMAGE)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise _Refused(UNDECODABLE_IMAGE)
    if array.shape[2] != channels:
        raise _Refused(WRONG_MODE)
    if array.shape[0] * array.shape[1] > MAX_SOURCE_PIXELS:
        raise _Refused(WRONG_SIZE)
    return array


def _resized(source: object, col: ColumnConfig) -> np.ndarray:
    """HWC uint8 pixels at the column's size, by its resize policy (or as they are)."""
    import numpy as np
    from PIL import Image

    assert col.shape is not None
    height, width, channels = col.shape
    if isinstance(source, np.ndarray):
        size = source.shape[1], source.shape[0]
    else:
        size = source.size  # type: ignore[attr-defined]
    too_large = size[0] > width or size[1] > height
    if size != (width, height) and (col.resize == "refuse" or (col.resize == "pad"
                                                               and too_large)):
        raise _Refused(WRONG_SIZE)
    if isinstance(source, np.ndarray):
        if size == (width, height):
            return source
        source = Image.fromarray(source[:, :, 0] if channels == 1 else source)
    elif col.resize == "fit" and size != (width, height):
        # A JPEG decodes at 1/2, 1/4 or 1/8 scale when that is still as large as wanted.
        source.draft(_MODES[channels], (width, height))  # type: ignore[attr-defined]
    image = _loaded(source)
    if size != (width, height):
        if col.resize == "fit":
            image = image.resize((width, height), Image.Resampling.LANCZOS)  # type: ignore
        else:
            canvas = Image.new(_MODES[channels], (width, height), 0)
            canvas.paste(image, ((width - size[0]) // 2, (height - size[1]) // 2))
            image = canvas
    return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)


def repeated_images(images: pl.DataFrame, units: pl.Series, candidates: pl.Series
                    ) -> pl.Series:
    """True for each candidate row whose person and decoded pixels (every image column)
    equal an earlier candidate's: the same image sent twice by one person.

    A row-against-rows rule, kept here beside the decoding it depends on; clean counts
    these rows as exact duplicates.
    """
    import numpy as np
    import polars as pl

    repeats = np.zeros(images.height, dtype=bool)
    if candidates.any():
        positions = candidates.arg_true()
        frame = images[positions].with_columns(units.gather(positions).alias("__unit"))
        first = frame.select(pl.struct(frame.columns).is_first_distinct()).to_series()
        repeats[positions.filter(~first).to_numpy()] = True
    return pl.Series(repeats)
