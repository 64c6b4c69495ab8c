"""Image manifests: a file of records whose image columns are read into the records as bytes.

A manifest (CSV, Parquet or NDJSON, read by `personanet.sources.files`) names, in each
`type = "image"` column, either a file (`image_source = "path"`: PNG, JPEG or NPY,
relative to the manifest's folder) or the image itself (`image_source = "bytes"`: raw
binary, as a Parquet binary column gives it, or base64 text). `ImageManifest` wraps the
manifest's `FileSource` and hands on the same records with each image column replaced
by the file's bytes (`pl.Binary`), read batch by batch, so collect puts the images
inside its encrypted artifact and nowhere else.

Nothing here decodes an image: that is clean's business (`personanet.cleaning.images`).
What only the file system can tell is said beside the bytes, in a status column per
image column (`status_column(name)`), for clean to quarantine the row with that reason:

- `path_outside_folder`: an absolute path, or one that leaves the manifest's folder
  through `..` or a symbolic link. Such a file is never opened: a manifest cannot make
  collect read (and store) whatever the user running it may read.
- `missing_file`: no regular file at the path (absent, a folder, a device).
- `image_too_large`: a file over `MAX_IMAGE_BYTES`, not read.
- `undecodable_image`: `image_source = "bytes"` text that is not base64.

A row is never dropped here, so every record stays accounted for. The manifest's
identity (`fingerprint`) covers the bytes of every image it names, so an edited PNG
makes a new collect version.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from stat import S_ISLNK, S_ISREG
from typing import TYPE_CHECKING, Any

from personanet.errors import BadInputError

if TYPE_CHECKING:
    import polars as pl

    from personanet.config import ColumnConfig
    from personanet.sources.files import FileSource

#: the largest image file collect reads (bytes); a larger one is quarantined unread
MAX_IMAGE_BYTES = 64 * 2**20

PATH_OUTSIDE_FOLDER = "path_outside_folder"
MISSING_FILE = "missing_file"
IMAGE_TOO_LARGE = "image_too_large"
UNDECODABLE_IMAGE = "undecodable_image"

#: prefix of the status columns; the same internal prefix as clean's work columns
STATUS_PREFIX = "__personanet.image_status:"
#: rows of the manifest handled at a time (each batch's images are in memory together)
READ_BATCH_ROWS = 1024


def status_column(name: str) -> str:
    """The column beside image column `name` that says why its bytes are null, if they are."""
    return f"{STATUS_PREFIX}{name}"


def is_status_column(name: str) -> bool:
    return name.startswith(STATUS_PREFIX)


def image_columns(columns: Mapping[str, ColumnConfig] | None) -> dict[str, str]:
    """The configured image columns: name -> image_source ("path" or "bytes")."""
    return {name: col.image_source for name, col in (columns or {}).items()
            if col.kind == "image"}


@dataclass
class ImageManifest:
    """A manifest file whose image columns are read as bytes (see the module docstring)."""

    inner: FileSource
    #: image column name -> "path" or "bytes"
    images: dict[str, str]
    #: per image column: the sha256 (or status) of each row's image, as `fingerprint` saw it
    _seen: dict[str, list[str]] | None = field(default=None, repr=False)
    #: manifest value -> (the real path it names, or None and a status)
    _resolved: dict[str, tuple[str | None, str | None]] = field(default_factory=dict,
                                                                repr=False)

    @property
    def name(self) -> str:
        return self.inner.name

    @cached_property
    def folder(self) -> str:
        """The manifest's folder, every link in it resolved: images must lie inside it."""
        return os.path.realpath(self.inner.path.parent)

    def describe(self) -> dict[str, Any]:
        """The manifest's path and size; its `sha256` is `fingerprint()`, which covers the
        images too, since whatever compares sources by it must see an edited image."""
        return {**self.inner.describe(), "sha256": self.fingerprint()}

    def fingerprint(self) -> str:
        """sha256 of the manifest's bytes and of every image it names, in row order."""
        paths = [n for n, kind in self.images.items() if kind == "path"]
        if not paths:
            return self.inner.fingerprint()  # the bytes are in the manifest itself
        if self._seen is None:
            frame = self.inner.read()
            self._seen = {n: [self._identity_of(v) for v in _texts(frame, n)]
                          for n in paths if n in frame.columns}
        digest = hashlib.sha256(b"personanet image manifest v1\0")
        digest.update(self.inner.fingerprint().encode())
        for name in sorted(self._seen):
            digest.update(f"\0{name}\0".encode())
            digest.update("\n".join(self._seen[name]).encode())
        return digest.hexdigest()

    def read(self) -> pl.DataFrame:
        import polars as pl

        frames = list(self.batches(READ_BATCH_ROWS))
        return pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]

    def batches(self, batch_size: int) -> Iterator[pl.DataFrame]:
        """The manifest's records with each image column as bytes and its status beside it.

        When `fingerprint` ran first, each file is checked to be the one it hashed: a file
        changed in between would make the artifact disagree with its identity.
        """
        start = 0
        for frame in self.inner.batches(min(batch_size, READ_BATCH_ROWS)):
            yield self._attach(frame, start)
            start += frame.height

    def _attach(self, frame: pl.DataFrame, start: int) -> pl.DataFrame:
        import polars as pl

        columns = []
        for name, kind in self.images.items():
            if name not in frame.columns:
                continue
            if kind == "bytes":
                data, status = _decode_bytes(frame[name])
            else:
                seen = (self._seen or {}).get(name)
                data, status = [], []
                for offset, value in enumerate(_texts(frame, name)):
                    content, problem = self._read(value)
                    expected = seen[start + offset] if seen and start + offset < len(seen) \
                        else None
                    if seen is not None and _identity(content, problem) != expected:
                        raise BadInputError(f"{self.name}: an image it names changed while it "
                                            "was collected; collect again")
                    data.append(content)
                    status.append(problem)
            columns += [pl.Series(name, data, dtype=pl.Binary),
                        pl.Series(status_column(name), status, dtype=pl.String)]
        return frame.with_columns(columns)

    def _resolve(self, value: str) -> tuple[str | None, str | None]:
        """The real path a manifest value names, or (None, why it names none)."""
        if value not in self._resolved:
            self._resolved[value] = _resolve(self.folder, value)
        return self._resolved[value]

    def _read(self, value: str | None) -> tuple[bytes | None, str | None]:
        """A manifest value's file bytes, or (None, status); a blank value is (None, None)."""
        if value is None:
            return None, None
        target, problem = self._resolve(value)
        return _read_file(target) if target is not None else (None, problem)

    def _identity_of(self, value: str | None) -> str:
        """What `fingerprint` hashes for one manifest value: its file's sha256, or its status."""
        if value is None:
            return "-"
        target, problem = self._resolve(value)
        if target is None:
            return problem or "-"
        try:
            stat = os.stat(target)
        except OSError:
            return MISSING_FILE
        key = (target, stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if key not in _DIGESTS:
            content, problem = _read_file(target)
            if content is None:
                return problem or "-"
            if len(_DIGESTS) > 1_000_000:
                _DIGESTS.clear()
            _DIGESTS[key] = hashlib.sha256(content).hexdigest()
        return _DIGESTS[key]


def _texts(frame: pl.DataFrame, name: str) -> list[str | None]:
    import polars as pl

    values = frame[name].cast(pl.String).str.strip_chars()
    return [v if v else None for v in values.to_list()]


def _resolve(folder: str, value: str) -> tuple[str | None, str | None]:
    """The file a manifest value names, or why it names none (a status)."""
    if os.path.isabs(value) or value.startswith(("~", "\\")):
        return None, PATH_OUTSIDE_FOLDER
    try:
        target, stat = _walk_down(folder, value)
        if target is None:
            # realpath follows every symbolic link, so a link leaving the folder is caught.
            target = os.path.realpath(os.path.join(folder, value))
            if os.path.commonpath([folder, target]) != folder:
                return None, PATH_OUTSIDE_FOLDER
            stat = os.stat(target)
    except (OSError, ValueError):  # absent, a NUL in the value, a loop of links
        return None, MISSING_FILE
    if not S_ISREG(stat.st_mode):
        return None, MISSING_FILE
    if stat.st_size > MAX_IMAGE_BYTES:
        return None, IMAGE_TOO_LARGE
    return target, None


def _walk_down(folder: str, value: str) -> tuple[str | None, os.stat_result | None]:
    """`folder/value` and its stat when the path only walks down through no link (the
    common case, two `lstat`s for `images/1.png`); (None, None) when `realpath` must judge.
    """
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None, None
    path, stat = folder, None
    for part in parts:
        path = f"{path}/{part}"
        stat = os.lstat(path)
        if S_ISLNK(stat.st_mode):
            return None, None
    return path, stat


def _read_file(target: str) -> tuple[bytes | None, str | None]:
    """A resolved file's bytes (at most MAX_IMAGE_BYTES), or (None, status)."""
    try:
        with open(target, "rb") as handle:
            content = handle.read(MAX_IMAGE_BYTES + 1)
    except OSError:
        return None, MISSING_FILE
    if len(content) > MAX_IMAGE_BYTES:
        return None, IMAGE_TOO_LARGE
    return content, None


def _identity(content: bytes | None, problem: str | None) -> str:
    if content is not None:
        return hashlib.sha256(content).hexdigest()
    return problem or "-"


#: sha256 of image files already hashed in this process, keyed by what stat says of them:
#: every stage of `personanet run` asks for collect's identity, and hashing once is enough
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def _decode_bytes(values: pl.Series) -> tuple[list[bytes | None], list[str | None]]:
    """Raw binary as it is; text as base64 (a data: URL prefix allowed), else a status."""
    import polars as pl

    if values.dtype == pl.Binary:
        return values.to_list(), [None] * values.len()
    data: list[bytes | None] = []
    status: list[str | None] = []
    for text in values.cast(pl.String).to_list():
        text = (text or "").strip()
        if not text:
            data.append(None)
            status.append(None)
            continue
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            data.append(base64.b64decode(text, validate=True))
            status.append(None)
        except (binascii.Error, ValueError):
            data.append(None)
            status.append(UNDECODABLE_IMAGE)
    return data, status
