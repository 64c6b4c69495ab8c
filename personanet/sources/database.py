"""Database sources: a table or a query of SQLite or PostgreSQL, streamed in record batches.

Read through the ADBC drivers (`adbc-driver-sqlite`, `adbc-driver-postgresql`, the `db`
extra): measured against connectorx on the same 1M-row table (benchmarks/bench_database.py)
they read 1.16x (SQLite) and 1.12x (PostgreSQL) faster at the same peak memory, and unlike
connectorx they bind parameters, so the incremental watermark reaches the server as a typed
value, never spliced into SQL text. Rows arrive as Arrow record batches and leave as text
columns of at most `batch_size` rows: nothing holds the whole result.

Credentials: the URI comes from an environment variable or a file the config names, never
from the config itself. What a manifest, a log line or an error says about the database is
`public_uri` (scheme, host, port, database name); every driver message passes through
`Credential.scrub` first, which removes the URI, its user:password part and the password
wherever they appear.

Identity (`fingerprint`): the query as sent plus a sha256 of the rows read, in order and
self-delimiting (a field's byte length before its bytes, nulls marked), so an unchanged
table is reused and any changed value, row or column makes a new version.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet.config import DatabaseConfig, SourceConfig
from personanet.errors import ConfigError, InputMissingError, KeyAccessError, PersonaNetError

if TYPE_CHECKING:
    import polars as pl

#: how the reading query names the configured query inside it
SUBQUERY = "personanet_rows"


@dataclass(frozen=True)
class Credential:
    """The connection URI, held only in memory, and what may be said about it."""

    uri: str
    #: where it came from, for messages: "$PERSONA_DB", "file db.uri", "sqlite file x.db"
    origin: str

    @property
    def kind(self) -> str:
        scheme = self.uri.split(":", 1)[0].lower()
        if scheme in ("postgresql", "postgres"):
            return "postgresql"
        if scheme in ("sqlite", "file") or "://" not in self.uri:
            return "sqlite"
        raise ConfigError(f"the URI in {self.origin} has scheme {scheme!r}: use "
                          "postgresql://user:password@host:port/dbname or sqlite:///path/file.db")

    @property
    def public_uri(self) -> str:
        """scheme://host:port/dbname: no user, no password, no query parameters."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.sqlite_path}"
        parts = urllib.parse.urlsplit(self.uri)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"

    @property
    def sqlite_path(self) -> str:
        path = self.uri
        for prefix in ("sqlite:///", "sqlite://", "file:"):
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
        return path.split("?", 1)[0]

    def secrets(self) -> list[str]:
        """Every form of the secret part that a driver might echo, longest first."""
        found = {self.uri}
        parts = urllib.parse.urlsplit(self.uri) if "://" in self.uri else None
        if parts is not None:
            userinfo = parts.netloc.rpartition("@")[0]
            if userinfo:
                found.add(userinfo)
            if parts.password:
                found |= {parts.password, urllib.parse.unquote(parts.password)}
            for name, value in urllib.parse.parse_qsl(parts.query):
                if name.lower() in ("password", "sslpassword", "passfile"):
                    found.add(value)
        return sorted((s for s in found if len(s) >= 3), key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """`text` without the URI or any part of its secret (driver messages, errors)."""
        for secret in self.secrets():
            text = text.replace(secret, "***")
        # Any other URI with credentials (a driver may rebuild one): keep scheme and host.
        text = re.sub(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]*@", r"\1***@", text, flags=re.I)
        return re.sub(r"(password\s*=\s*)\S+", r"\1***", text, flags=re.I)


def credential(settings: DatabaseConfig, *, base: Path) -> Credential:
    """The URI from where the config says it is; KeyAccessError (77) when it is not there."""
    if settings.sqlite is not None:
        path = Path(settings.sqlite).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise InputMissingError(f"SQLite database {path} not found (dataset.database.sqlite)")
        return Credential(str(path), f"sqlite file {path}")
    if settings.uri_env is not None:
        uri = os.environ.get(settings.uri_env, "").strip()
        if not uri:
            raise KeyAccessError(f"environment variable {settings.uri_env} (dataset.database."
                                 "uri_env) is not set: export it with the database URI")
        return Credential(uri, f"${settings.uri_env}")
    assert settings.uri_file is not None
    path = Path(settings.uri_file).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        lines = path.read_text("utf-8").strip().splitlines()
    except OSError as exc:
        raise KeyAccessError(f"cannot read the database URI file {path} (dataset.database."
                             f"uri_file): {exc.strerror}") from None
    if not lines or not lines[0].strip():
        raise KeyAccessError(f"the database URI file {path} is empty")
    return Credential(lines[0].strip(), f"file {path}")


@dataclass
class DatabaseSource:
    """The rows of one table or query, read with the config's `[source]` text options.

    `after` (set by `collect --incremental`) keeps only rows whose watermark column is past
    it; `watermark_reached` is the largest watermark value read, known once read.

    With `held` (the digests of the rows the chain already holds at `after`) the rows *at*
    `after` are read again and those already held are skipped: a row that arrives later
    with the same watermark value (one second's worth of `updated_at`, a transaction
    committed late) is collected instead of missed. `held_reached` is the same set for
    `watermark_reached`, for the next collection.
    """

    settings: DatabaseConfig
    options: SourceConfig = field(default_factory=SourceConfig)
    base: Path = field(default_factory=Path.cwd)
    after: Any = None
    watermark_reached: Any = None
    held: list[str] | None = None
    held_reached: list[str] = field(default_factory=list)
    _identity: str | None = None
    _rows: int | None = None

    def __post_init__(self) -> None:
        self.credential = credential(self.settings, base=self.base)

    @property
    def name(self) -> str:
        what = (f"table {self.settings.table}" if self.settings.table
                else "the configured query")
        return f"{self.credential.public_uri} ({what})"

    # ------------------------------------------------------------------ the query

    @property
    def sql(self) -> str:
        """The statement sent: the table or query, past the watermark, in its order.

        The table and watermark names are checked as plain identifiers (config validation),
        the query is the config author's own, and the watermark value is a bound parameter.
        """
        db = self.settings
        inner = (f"SELECT * FROM {db.table}" if db.table  # noqa: S608
                 else db.query.strip().rstrip(";").strip() if db.query else "")
        if db.watermark is None:
            return inner
        mark = f"{SUBQUERY}.{db.watermark}"
        # Inclusive when the rows held at `after` are known (they are skipped by digest).
        where = ("" if self.after is None else
                 f" WHERE {mark} >= $1" if self.held is not None else f" WHERE {mark} > $1")
        return f"SELECT * FROM ({inner}) AS {SUBQUERY}{where} ORDER BY {mark}"  # noqa: S608

    # ------------------------------------------------------------------ identity

    def fingerprint(self) -> str:
        """sha256 of the query text, the watermark it starts after, and the rows read."""
        if self._identity is None:
            digest = hashlib.sha256()
            for _ in self._text_batches(self.settings.batch_size, digest):
                pass
            self._identity = self._identity_of(digest)
        return self._identity

    def _identity_of(self, rows_digest: Any) -> str:
        payload = repr((self.sql, repr(self.after), rows_digest.hexdigest()))
        return hashlib.sha256(payload.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        what = {"table": self.settings.table} if self.settings.table else {
            "query_sha256": hashlib.sha256(self.sql.encode()).hexdigest()}
        return {"database": self.credential.public_uri, **what, "sha256": self.fingerprint(),
                "rows": self._rows or 0}

    # ------------------------------------------------------------------ reading

    def read(self) -> pl.DataFrame:
        import polars as pl

        frames = list(self.batches(self.settings.batch_size))
        return pl.concat(frames, how="vertical") if frames else pl.DataFrame()

    def batches(self, batch_size: int) -> Iterator[pl.DataFrame]:
        """Text frames of at most `batch_size` rows. Raises BadInputError (65) when the rows
        differ from those `fingerprint` read (the table changed in between)."""
        digest = hashlib.sha256()
        yield from self._text_batches(batch_size, digest)
        if self._identity is not None and self._identity_of(digest) != self._identity:
            from personanet.errors import BadInputError

            raise BadInputError(f"{self.name}: the rows changed while collect read them; run "
                                "collect again")

    def _text_batches(self, batch_size: int, digest: Any) -> Iterator[pl.DataFrame]:
        import polars as pl

        from personanet.sources.files import _as_text

        rows, reached = 0, self.after
        mark = self.settings.watermark
        boundary = Boundary(self.after, self.held)
        header: list[str] | None = None
        for batch in self._arrow_batches():
            for start in range(0, max(batch.num_rows, 1), batch_size):
                piece = batch.slice(start, batch_size)
                frame = pl.from_arrow(piece)
                assert isinstance(frame, pl.DataFrame)
                if header is None:
                    header = frame.columns
                    digest.update(repr(header).encode())
                if mark is not None and piece.num_rows:
                    reached = _largest(reached, frame, mark, self.name)
                text = _as_text(frame, self.options, Path(self.name))
                if mark is not None and text.height:
                    text = boundary.new_rows(frame[mark], text)
                digest.update(_row_bytes(text))
                rows += text.height
                if text.height:
                    yield text
        self._rows = rows
        self.watermark_reached = reached
        self.held_reached = boundary.held_at(reached)

    def _arrow_batches(self) -> Iterator[Any]:
        """Arrow record batches from the driver; every failure scrubbed of the credential."""
        driver = _driver(self.credential.kind)
        cred = self.credential
        try:
            target = (f"file:{cred.sqlite_path}?mode=ro" if cred.kind == "sqlite" else cred.uri)
            conn = driver.connect(target)
        except driver.Error as exc:
            raise _connect_error(cred, exc) from None
        try:
            cur = conn.cursor()
            if cred.kind == "sqlite":
                cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows":
                                                  str(self.settings.batch_size)})
            try:
                params = (self.after,) if self.after is not None else None
                cur.execute(self.sql, params)
                reader = cur.fetch_record_batch()
            except driver.Error as exc:
                raise ConfigError(f"{self.name}: the query failed: "
                                  f"{_first_line(cred.scrub(str(exc)))} (dataset.database."
                                  f"{'table' if self.settings.table else 'query'})") from None
            try:
                yield from reader
            except (driver.Error, OSError) as exc:
                raise InputMissingError(f"{self.name}: reading failed: "
                                        f"{_first_line(cred.scrub(str(exc)))}") from None
        finally:
            with contextlib.suppress(driver.Error):  # closing a broken connection
                conn.close()


def _driver(kind: str) -> Any:
    try:
        if kind == "postgresql":
            import adbc_driver_postgresql.dbapi as driver
        else:
            import adbc_driver_sqlite.dbapi as driver
    except ImportError:
        raise ConfigError(f"reading {kind} needs the database drivers: pip install "
                          "'personanet[db]'") from None
    return driver


def _connect_error(cred: Credential, exc: BaseException) -> PersonaNetError:
    """Authentication refused: 77 (like a wrong key); anything else unreachable: 66."""
    text = _first_line(cred.scrub(str(exc)))
    if re.search(r"authentication|password|permission denied|role .* does not exist", text,
                 re.I):
        return KeyAccessError(f"{cred.public_uri}: the database refused the credentials in "
                              f"{cred.origin}: {text}")
    return InputMissingError(f"{cred.public_uri}: cannot connect: {text}")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else "unknown error"


def _largest(current: Any, frame: pl.DataFrame, column: str, name: str) -> Any:
    if column not in frame.columns:
        raise ConfigError(f"{name}: dataset.database.watermark {column!r} is not a column of "
                          f"the rows read (columns: {', '.join(frame.columns)})")
    top = frame[column].drop_nulls().max()
    if top is None:
        return current
    return top if current is None or top > current else current


class Boundary:
    """The rows at the watermark: those held already are skipped, those at the newest
    value are remembered (as sha256 digests of their text; multiset: a row held once and
    sent twice is kept once)."""

    def __init__(self, after: Any, held: list[str] | None) -> None:
        from collections import Counter

        self.after = after
        self.held = Counter(held or ())
        self.was_held = list(held or ())
        self.top: Any = after
        self.at_top: list[str] = []

    def new_rows(self, marks: pl.Series, text: pl.DataFrame) -> pl.DataFrame:
        """`text` without the rows held at `after`; remembers the rows at the largest mark."""
        import polars as pl

        keep = [True] * text.height
        if self.held and self.after is not None:
            for i in (marks == self.after).fill_null(False).arg_true().to_list():
                row = _row_digest(text[i])
                if self.held[row] > 0:
                    self.held[row] -= 1
                    keep[i] = False
            text = text.filter(pl.Series(keep)) if not all(keep) else text
            marks = marks.filter(pl.Series(keep)) if not all(keep) else marks
        top = marks.drop_nulls().max()
        if top is not None and (self.top is None or top > self.top):
            self.top, self.at_top = top, []
        if self.top is not None:
            self.at_top += [_row_digest(text[i]) for i in
                            (marks == self.top).fill_null(False).arg_true().to_list()]
        return text

    def held_at(self, reached: Any) -> list[str]:
        """The digests of every row the chain will hold at `reached` once these are kept."""
        if reached is None:
            return []
        earlier = self.was_held if reached == self.after else []
        return [*earlier, *(self.at_top if reached == self.top else [])]


def _row_digest(row: pl.DataFrame) -> str:
    return hashlib.sha256(_row_bytes(row)).hexdigest()


def _row_bytes(frame: pl.DataFrame) -> bytes:
    """The rows of a text frame as self-delimiting bytes: equal bytes, equal rows in order."""
    import polars as pl

    if frame.height == 0 or not frame.columns:
        return b""
    fields = [pl.when(pl.col(c).is_null()).then(pl.lit("\x00"))
              .otherwise(pl.concat_str(pl.lit("\x01"), pl.col(c).str.len_bytes().cast(pl.String),
                                       pl.lit(":"), pl.col(c)))
              for c in frame.columns]
    return str(frame.select(pl.concat_str(fields).str.join("")).item()).encode()
