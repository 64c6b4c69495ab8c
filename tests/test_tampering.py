"""Tampering with encrypted files: every change is rejected, and nothing is released.

Property-based over the file format of docs/encryption.md (1,400 generated cases,
deterministic): flipped bytes anywhere, truncation at any length, appended bytes,
reordered / dropped / duplicated chunks, chunks transplanted between two files
under the same master key, swapped headers and header fields, key ids that no
loaded key has. Each case must fail with IntegrityError (exit 65) or, for a key id
that is not the loaded key's, KeyAccessError (exit 77); the streaming reader may
only have released plaintext that is a genuine prefix of the original, and the
file-to-file decryptor leaves no output at all.

Then the same through the CLI on a real collect artifact: `clean` exits 65 (77)
and writes no clean artifact, `artifacts verify` exits 65 naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personanet.errors import IntegrityError, KeyAccessError
from personanet.store.artifacts import sha256_file
from personanet.store.crypto import (
    EncryptingWriter,
    decrypt_bytes,
    decrypt_file_to,
    decrypt_stream,
    read_encrypted_file,
    write_encrypted_file,
)
from personanet.store.crypto_header import HEADER_SIZE, MIN_CHUNK_SIZE
from personanet.store.keys import MasterKey

# Fixed keys: generated examples must not depend on a function-scoped fixture.
KEY = MasterKey(hashlib.sha256(b"personanet test_tampering key").digest())
CHUNK = MIN_CHUNK_SIZE  # the smallest legal chunk: many chunks from small payloads
SEALED = CHUNK + 16
KEY_ID = slice(9, 17)
CHECKSUM_START = HEADER_SIZE - 16

# Byte layout of the header (docs/encryption.md).
FIELDS = {
    "version": slice(8, 9),
    "key id": slice(9, 17),
    "chunk size": slice(17, 21),
    "nonce prefix": slice(21, 28),
    "wrap nonce": slice(28, 40),
    "wrapped key": slice(40, 88),
    "wrap nonce and wrapped key": slice(28, 88),
}


def fuzz(max_examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Payload sizes: anything up to 5 chunks, with exact multiples of the chunk size (the
# final chunk is full) and the empty plaintext drawn often.
sizes = st.one_of(st.integers(0, 5 * CHUNK + 300), st.integers(0, 5).map(lambda n: n * CHUNK))
multi_chunk_sizes = st.one_of(st.integers(CHUNK + 1, 6 * CHUNK),
                              st.integers(2, 6).map(lambda n: n * CHUNK))
seeds = st.integers(0, 2**32 - 1)


def plaintext(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def seal(data: bytes, key: MasterKey = KEY, chunk_size: int = CHUNK) -> bytes:
    out = io.BytesIO()
    with EncryptingWriter(out, key, chunk_size=chunk_size) as writer:
        writer.write(data)
    return out.getvalue()


def chunks_of(blob: bytes, sealed_size: int = SEALED) -> list[bytes]:
    payload = blob[HEADER_SIZE:]
    return [payload[i : i + sealed_size] for i in range(0, len(payload), sealed_size)]


def with_checksum(header: bytes | bytearray) -> bytes:
    """What a forger who knows the format writes: the unkeyed checksum recomputed."""
    body = bytes(header[:CHECKSUM_START])
    return body + hashlib.sha256(body).digest()[:16]


def assert_rejected(blob: bytes, original: bytes, *, error: type[Exception] = IntegrityError,
                    key: MasterKey = KEY) -> Exception:
    """`blob` is refused by every reader, and no unauthenticated plaintext escapes."""
    with pytest.raises(error) as whole:
        decrypt_bytes(blob, key)

    # Streaming may release chunks before it finds the damage, but only authenticated
    # ones: what it released is a prefix of what was really encrypted.
    released: list[bytes] = []
    with pytest.raises(error):
        for piece in decrypt_stream(io.BytesIO(blob), key):
            released.append(piece)
    assert original.startswith(b"".join(released))

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.enc", Path(folder) / "out.bin"
        source.write_bytes(blob)
        with pytest.raises(error):
            read_encrypted_file(source, key)
        with pytest.raises(error):
            decrypt_file_to(source, target, key)
        assert os.listdir(folder) == ["in.enc"], "no output file, no temporary plaintext"
    assert whole.value.exit_code == (77 if error is KeyAccessError else 65)
    return whole.value


def test_untampered_files_open() -> None:
    # The baseline the properties below change one thing in.
    for size in (0, 1, CHUNK, 3 * CHUNK, 3 * CHUNK + 5):
        data = plaintext(size, size)
        assert decrypt_bytes(seal(data), KEY) == data


# ----------------------------------------------------------------------------- properties


@fuzz(300)
@given(size=sizes, seed=seeds, position=st.integers(0, 2**31), mask=st.integers(1, 255))
def test_flipped_byte_anywhere_is_rejected(size: int, seed: int, position: int, mask: int
                                           ) -> None:
    original = plaintext(size, seed)
    blob = bytearray(seal(original))
    blob[position % len(blob)] ^= mask
    # Header damage is caught by its checksum (65, never "wrong key"), payload by GCM.
    assert_rejected(bytes(blob), original)


@fuzz(150)
@given(size=sizes, seed=seeds, offset=st.integers(8, CHECKSUM_START - 1),
       mask=st.integers(1, 255))
def test_forged_header_field_with_a_valid_checksum_is_rejected(size: int, seed: int,
                                                               offset: int, mask: int) -> None:
    original = plaintext(size, seed)
    blob = seal(original)
    header = bytearray(blob[:HEADER_SIZE])
    header[offset] ^= mask
    forged = with_checksum(header) + blob[HEADER_SIZE:]
    in_key_id = KEY_ID.start <= offset < KEY_ID.stop
    assert_rejected(forged, original, error=KeyAccessError if in_key_id else IntegrityError)


@fuzz(200)
@given(size=sizes, seed=seeds, data=st.data())
def test_truncated_file_is_rejected_at_any_length(size: int, seed: int, data: st.DataObject
                                                  ) -> None:
    original = plaintext(size, seed)
    blob = seal(original)
    boundaries = [HEADER_SIZE + i * SEALED for i in range(len(chunks_of(blob)))]
    cut = data.draw(st.one_of(st.integers(0, len(blob) - 1), st.sampled_from(boundaries)),
                    label="cut")
    assert_rejected(blob[:cut], original)


@fuzz(150)
@given(size=sizes, seed=seeds, data=st.data())
def test_appended_bytes_are_rejected(size: int, seed: int, data: st.DataObject) -> None:
    original = plaintext(size, seed)
    blob = seal(original)
    other = seal(plaintext(size, seed + 1))
    chunks = chunks_of(blob)
    extra = data.draw(st.one_of(
        st.binary(min_size=1, max_size=3 * SEALED),
        st.sampled_from(chunks),                    # a copy of one of its own chunks
        st.sampled_from(chunks_of(other)),          # a chunk of a sibling file
        st.just(other),                             # a whole second file
        st.just(blob[HEADER_SIZE:]),                # its own payload again
    ), label="extra")
    assert_rejected(blob + extra, original)


@fuzz(200)
@given(size=multi_chunk_sizes, seed=seeds, data=st.data())
def test_reordered_dropped_or_duplicated_chunks_are_rejected(size: int, seed: int,
                                                             data: st.DataObject) -> None:
    original = plaintext(size, seed)
    blob = seal(original)
    chunks = chunks_of(blob)
    n = len(chunks)
    order = data.draw(st.one_of(
        st.permutations(range(n)),
        st.lists(st.integers(0, n - 1), min_size=1, max_size=n + 2),
    ).filter(lambda o: list(o) != list(range(n))), label="order")
    assert_rejected(blob[:HEADER_SIZE] + b"".join(chunks[i] for i in order), original)


@fuzz(150)
@given(size=multi_chunk_sizes, seed=seeds, same_plaintext=st.booleans(), data=st.data())
def test_chunk_transplanted_between_files_under_the_same_key_is_rejected(
        size: int, seed: int, same_plaintext: bool, data: st.DataObject) -> None:
    original = plaintext(size, seed)
    target = chunks_of(blob := seal(original))
    # Even an encryption of the very same records has its own data key and nonce prefix.
    donor = chunks_of(seal(original if same_plaintext else plaintext(size, seed + 1)))
    positions = data.draw(st.lists(st.integers(0, len(target) - 1), min_size=1, unique=True),
                          label="positions")
    same_position = data.draw(st.booleans(), label="same_position")
    for i in positions:
        j = i if same_position and i < len(donor) else data.draw(
            st.integers(0, len(donor) - 1), label="donor chunk")
        target[i] = donor[j]
    assert_rejected(blob[:HEADER_SIZE] + b"".join(target), original)


@fuzz(100)
@given(size=sizes, other_size=sizes, seed=seeds, field=st.sampled_from(
    ["whole header", "nonce prefix", "wrap nonce", "wrapped key", "wrap nonce and wrapped key"]))
def test_swapped_headers_and_header_fields_are_rejected(size: int, other_size: int, seed: int,
                                                        field: str) -> None:
    original = plaintext(size, seed)
    blob = seal(original)
    other = seal(plaintext(other_size, seed + 1))  # same master key
    if field == "whole header":
        forged = other[:HEADER_SIZE] + blob[HEADER_SIZE:]
    else:
        header = bytearray(blob[:HEADER_SIZE])
        header[FIELDS[field]] = other[FIELDS[field]]
        forged = with_checksum(header) + blob[HEADER_SIZE:]
    assert_rejected(forged, original)


@fuzz(100)
@given(size=sizes, seed=seeds, key_id=st.binary(min_size=8, max_size=8))
def test_key_id_that_no_loaded_key_has_is_refused_naming_both_ids(size: int, seed: int,
                                                                  key_id: bytes) -> None:
    original = plaintext(size, seed)
    blob = seal(original)
    if key_id.hex() == KEY.key_id:
        key_id = bytes(b ^ 0xFF for b in key_id)
    header = bytearray(blob[:HEADER_SIZE])
    header[KEY_ID] = key_id
    error = assert_rejected(with_checksum(header) + blob[HEADER_SIZE:], original,
                            error=KeyAccessError)
    message = str(error)
    assert key_id.hex() in message and KEY.key_id in message
    assert KEY.to_base64() not in message and KEY.material.hex() not in message


@fuzz(50)
@given(size=sizes, seed=seeds, material=st.binary(min_size=32, max_size=32))
def test_file_sealed_under_another_master_key_is_refused(size: int, seed: int,
                                                         material: bytes) -> None:
    other = MasterKey(material)
    if other == KEY:
        return
    original = plaintext(size, seed)
    error = assert_rejected(seal(original, key=other), original, error=KeyAccessError)
    assert other.key_id in str(error) and KEY.key_id in str(error)


# ----------------------------------------------------------------------------- through the CLI

RECORDS = "records.parquet.enc"


@pytest.fixture
def collected(cli, key_env: MasterKey, small_config: Path) -> Path:
    result = cli("--json", "--config", small_config, "collect")
    assert result.code == 0, result.stderr
    return Path(result.json()["path"])


def rechunked(data: bytes, key: MasterKey) -> bytes:
    """The records re-encrypted in 1 KiB chunks: a valid file with many chunks to move."""
    return seal(data, key=key, chunk_size=CHUNK)


def forge_manifest(artifact: Path, key: MasterKey) -> None:
    """Make the manifest's checksums agree with the tampered file, and re-seal it.

    Re-sealing needs the key, which an attacker lacks: it takes the manifest seal out of
    the way so that these tests show what the encrypted format alone catches.
    """
    from personanet.stages.base import sealer_for

    manifest_path = artifact / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for out in manifest["outputs"]:
        path = artifact / out["name"]
        out["sha256"], out["bytes"] = sha256_file(path), path.stat().st_size
    manifest_path.write_text(json.dumps(sealer_for(key).seal(manifest)))


def tamper(kind: str, path: Path, key: MasterKey) -> None:
    blob = path.read_bytes()
    records = decrypt_bytes(blob, key)
    if kind == "payload byte flipped":
        data = bytearray(blob)
        data[(HEADER_SIZE + len(blob)) // 2] ^= 0x01
        blob = bytes(data)
    elif kind == "header byte flipped":
        data = bytearray(blob)
        data[30] ^= 0x80
        blob = bytes(data)
    elif kind == "truncated":
        blob = blob[:-100]
    elif kind == "bytes appended":
        blob += os.urandom(SEALED)
    elif kind == "header of another encryption of the same records":
        other = io.BytesIO()
        write = EncryptingWriter(other, key)
        write.write(records)
        write.close()
        blob = other.getvalue()[:HEADER_SIZE] + blob[HEADER_SIZE:]
    elif kind == "chunks swapped, checksums forged":
        rewritten = rechunked(records, key)
        chunks = chunks_of(rewritten)
        chunks[1], chunks[2] = chunks[2], chunks[1]
        blob = rewritten[:HEADER_SIZE] + b"".join(chunks)
    elif kind == "chunk transplanted, checksums forged":
        rewritten, sibling = rechunked(records, key), rechunked(records, key)
        chunks = chunks_of(rewritten)
        chunks[1] = chunks_of(sibling)[1]
        blob = rewritten[:HEADER_SIZE] + b"".join(chunks)
    elif kind == "last chunk dropped, checksums forged":
        rewritten = rechunked(records, key)
        blob = rewritten[:HEADER_SIZE] + b"".join(chunks_of(rewritten)[:-1])
    elif kind == "unknown key id, checksums forged":
        header = bytearray(blob[:HEADER_SIZE])
        header[KEY_ID] = bytes(8)
        blob = with_checksum(header) + blob[HEADER_SIZE:]
    else:  # pragma: no cover
        raise AssertionError(kind)
    path.write_bytes(blob)
    if "forged" in kind:
        forge_manifest(path.parent, key)


TAMPERINGS = [
    ("payload byte flipped", 65),
    ("header byte flipped", 65),
    ("truncated", 65),
    ("bytes appended", 65),
    ("header of another encryption of the same records", 65),
    ("chunks swapped, checksums forged", 65),
    ("chunk transplanted, checksums forged", 65),
    ("last chunk dropped, checksums forged", 65),
    ("unknown key id, checksums forged", 77),
]


def first_email(csv_path: Path) -> str:
    return csv_path.read_text().splitlines()[1].split(",")[1]


@pytest.mark.parametrize(("kind", "code"), TAMPERINGS, ids=[k for k, _ in TAMPERINGS])
def test_tampered_collect_artifact_stops_clean_and_verify(cli, key_env: MasterKey,
                                                          collected: Path, small_config: Path,
                                                          small_csv: Path, tmp_path: Path,
                                                          kind: str, code: int) -> None:
    tamper(kind, collected / RECORDS, key_env)

    result = cli("--json", "--config", small_config, "clean")
    assert result.code == code, result.stderr
    assert "Traceback" not in result.stderr
    # One error line (before it, clean logs which collect artifact of the chain it reads).
    (line,) = [entry for entry in result.stderr.strip().splitlines() if "error:" in entry]
    assert RECORDS in line
    if code == 77:
        assert "0000000000000000" in line and key_env.key_id in line
    clean_dir = tmp_path / "artifacts" / "persona" / "clean"
    assert not clean_dir.exists() or list(clean_dir.iterdir()) == [], \
        "no clean artifact, not even a temporary folder"
    # Nothing decrypted reached the disk: no record value anywhere under the root.
    everything = b"".join(p.read_bytes() for p in (tmp_path / "artifacts").rglob("*")
                          if p.is_file())
    assert first_email(small_csv).encode() not in everything

    verified = cli("--config", small_config, "artifacts", "verify")
    assert verified.code == code, verified.stderr
    assert RECORDS in verified.stderr and "Traceback" not in verified.stderr


def test_wrong_master_key_is_exit_77_for_clean_and_verify(cli, collected: Path, small_config: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    other = MasterKey.generate()
    monkeypatch.setenv("PERSONANET_KEY", other.to_base64())
    for args in (("clean",), ("artifacts", "verify")):
        result = cli("--config", small_config, *args)
        assert result.code == 77, result.stderr
        assert other.key_id in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "artifacts" / "persona" / "clean").exists()


def test_collect_file_replaced_by_another_valid_file_is_caught_by_verify(
        cli, key_env: MasterKey, collected: Path, small_config: Path) -> None:
    # A whole valid file under the same key (an older export, another dataset's records)
    # authenticates; only the manifest's ciphertext hash can tell (docs/encryption.md).
    write_encrypted_file(collected / RECORDS, b"not the records this manifest lists", key_env)
    verified = cli("--config", small_config, "artifacts", "verify")
    assert verified.code == 65 and RECORDS in verified.stderr


def test_collect_file_replaced_by_another_valid_file_is_refused_by_clean(
        cli, key_env: MasterKey, collected: Path, small_config: Path, small_csv: Path,
        tmp_path: Path) -> None:
    # The swapped-in file is a genuine collect output of other people (same key, valid).
    others = tmp_path / "others.csv"
    lines = small_csv.read_text().splitlines(keepends=True)
    others.write_text(lines[0] + "".join(lines[-50:]))
    second = cli("--json", "--config", small_config, "collect", "--source", others)
    assert second.code == 0, second.stderr
    (collected / RECORDS).write_bytes((Path(second.json()["path"]) / RECORDS).read_bytes())

    result = cli("--config", small_config, "clean", "--input", collected.name)
    assert result.code == 65, result.stderr
    assert RECORDS in result.stderr
