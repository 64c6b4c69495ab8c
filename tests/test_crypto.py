"""Behaviour of the encrypted file format and of master keys (docs/encryption.md).

Real AES-GCM, real files in tmp_path. A small chunk size keeps multi-chunk cases fast.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import random
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personanet.errors import (
    BadInputError,
    InputMissingError,
    IntegrityError,
    KeyAccessError,
    OutputError,
)
from personanet.store import crypto
from personanet.store.crypto import (
    DEFAULT_CHUNK_SIZE,
    EncryptingWriter,
    decrypt_bytes,
    decrypt_file_to,
    decrypt_stream,
    encrypt_bytes,
    encrypt_stream,
    is_encrypted,
    read_encrypted_file,
    rewrap_file,
    write_encrypted_file,
)
from personanet.store.crypto_header import HEADER_SIZE, MAGIC, Header, read_header
from personanet.store.keys import KEY_BYTES, MasterKey, load_master_key, write_key_file

CHUNK = 1024
SEALED = CHUNK + 16  # a full chunk on disk: plaintext plus the GCM tag
KEY_ID_SLICE = slice(len(MAGIC) + 1, len(MAGIC) + 1 + 8)


@pytest.fixture
def key() -> MasterKey:
    return MasterKey.generate()


def plaintext(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def seal(data: bytes, key: MasterKey, chunk_size: int = CHUNK) -> bytes:
    out = io.BytesIO()
    encrypt_stream([data], out, key, chunk_size=chunk_size)
    return out.getvalue()


def open_sealed(blob: bytes, key: MasterKey) -> bytes:
    return b"".join(decrypt_stream(io.BytesIO(blob), key))


def chunks_of(blob: bytes) -> list[bytes]:
    payload = blob[HEADER_SIZE:]
    return [payload[i : i + SEALED] for i in range(0, len(payload), SEALED)]


def with_valid_checksum(header: bytes) -> bytes:
    body = header[: HEADER_SIZE - 16]
    return body + hashlib.sha256(body).digest()[:16]


# --------------------------------------------------------------------------- roundtrip


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 5 * CHUNK + 7], ids=lambda n: f"{n}B"
)
def test_roundtrip_preserves_every_size(key: MasterKey, size: int) -> None:
    data = plaintext(size)
    blob = seal(data, key)
    assert open_sealed(blob, key) == data
    # Exact multiples end with a full chunk flagged final; only empty input has an empty one.
    expected_chunks = max(1, -(-size // CHUNK))
    assert len(blob) == HEADER_SIZE + size + 16 * expected_chunks


def test_ciphertext_does_not_contain_plaintext(key: MasterKey) -> None:
    data = b"alice@example.org;1984-02-29;" * 100
    blob = seal(data, key)
    assert b"alice@example.org" not in blob


def test_encrypting_the_same_bytes_twice_gives_different_files(key: MasterKey) -> None:
    assert seal(b"same", key) != seal(b"same", key)


def test_writer_accepts_pieces_of_any_size(key: MasterKey) -> None:
    data = plaintext(7 * CHUNK + 3)
    cuts = [0, 1, 5, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK, 6 * CHUNK + 1000, len(data)]
    out = io.BytesIO()
    with EncryptingWriter(out, key, chunk_size=CHUNK) as writer:
        for start, end in itertools.pairwise(cuts):
            assert writer.write(data[start:end]) == end - start
        writer.write(memoryview(b""))
    assert writer.closed
    assert open_sealed(out.getvalue(), key) == data


def test_default_chunk_size_is_used(key: MasterKey) -> None:
    data = plaintext(DEFAULT_CHUNK_SIZE + 1)
    blob = encrypt_bytes(data, key)
    assert read_header(io.BytesIO(blob)).chunk_size == DEFAULT_CHUNK_SIZE
    assert decrypt_bytes(blob, key) == data


def test_encrypt_stream_returns_plaintext_length(key: MasterKey) -> None:
    assert encrypt_stream([b"ab", b"", b"cde"], io.BytesIO(), key, chunk_size=CHUNK) == 5


def test_writer_left_by_an_exception_is_unreadable(key: MasterKey) -> None:
    out = io.BytesIO()
    with pytest.raises(RuntimeError), EncryptingWriter(out, key, chunk_size=CHUNK) as writer:
        writer.write(plaintext(3 * CHUNK))
        raise RuntimeError("source failed")
    with pytest.raises(IntegrityError):
        open_sealed(out.getvalue(), key)


def test_encrypt_stream_of_a_failing_source_is_unreadable(key: MasterKey) -> None:
    def source() -> Iterator[bytes]:
        yield plaintext(CHUNK * 2)
        raise OSError("disk gone")

    out = io.BytesIO()
    with pytest.raises(OSError, match="disk gone"):
        encrypt_stream(source(), out, key, chunk_size=CHUNK)
    with pytest.raises(IntegrityError):
        open_sealed(out.getvalue(), key)


def test_write_after_close_is_an_error(key: MasterKey) -> None:
    writer = EncryptingWriter(io.BytesIO(), key, chunk_size=CHUNK)
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"x")


@pytest.mark.parametrize("chunk_size", [0, 1023, 16 * 1024 * 1024 + 1])
def test_writer_rejects_insane_chunk_size(key: MasterKey, chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        EncryptingWriter(io.BytesIO(), key, chunk_size=chunk_size)


def test_chunk_counter_overflow_is_refused(key: MasterKey, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypto, "_MAX_CHUNKS", 3)
    out = io.BytesIO()
    with pytest.raises(OutputError, match="too large"):
        encrypt_stream([plaintext(3 * CHUNK + 1)], out, key, chunk_size=CHUNK)
    monkeypatch.setattr(crypto, "_MAX_CHUNKS", 2**32)
    with pytest.raises(IntegrityError):
        open_sealed(out.getvalue(), key)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=6000),
    chunk_size=st.integers(min_value=1024, max_value=2500),
    cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=6),
)
def test_roundtrip_property(data: bytes, chunk_size: int, cuts: list[int]) -> None:
    key = MasterKey(b"\x07" * KEY_BYTES)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    out = io.BytesIO()
    assert encrypt_stream(pieces, out, key, chunk_size=chunk_size) == len(data)
    assert open_sealed(out.getvalue(), key) == data


# --------------------------------------------------------------------------- tampering


def test_flipped_byte_is_rejected(key: MasterKey) -> None:
    blob = seal(plaintext(4 * CHUNK + 100), key)
    rng = random.Random(20240229)
    offsets = rng.sample(range(HEADER_SIZE), 15) + rng.sample(range(HEADER_SIZE, len(blob)), 35)
    for offset in offsets:
        tampered = bytearray(blob)
        tampered[offset] ^= 1 << rng.randrange(8)
        allowed = (IntegrityError, KeyAccessError) if offset in range(9, 17) else IntegrityError
        with pytest.raises(allowed):
            decrypt_bytes(bytes(tampered), key)


def test_every_header_byte_is_protected(key: MasterKey) -> None:
    blob = seal(plaintext(10), key)
    for offset in range(HEADER_SIZE):
        tampered = bytearray(blob)
        tampered[offset] ^= 0x80
        with pytest.raises(IntegrityError):
            decrypt_bytes(bytes(tampered), key)


def test_corruption_is_exit_65_and_wrong_key_is_exit_77(key: MasterKey) -> None:
    blob = seal(b"data", key)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(IntegrityError) as corrupt:
        decrypt_bytes(bytes(tampered), key)
    assert isinstance(corrupt.value, BadInputError) and corrupt.value.exit_code == 65
    with pytest.raises(KeyAccessError) as wrong:
        decrypt_bytes(blob, MasterKey.generate())
    assert wrong.value.exit_code == 77


def test_streaming_reader_yields_only_authenticated_chunks(key: MasterKey) -> None:
    data = plaintext(3 * CHUNK + 10)
    tampered = bytearray(seal(data, key))
    tampered[HEADER_SIZE + 2 * SEALED + 5] ^= 1
    received: list[bytes] = []
    with pytest.raises(IntegrityError, match="chunk 2"):
        received.extend(decrypt_stream(io.BytesIO(bytes(tampered)), key))
    assert b"".join(received) == data[: 2 * CHUNK]


@pytest.mark.parametrize("exact_multiple", [False, True])
def test_truncated_file_is_rejected(key: MasterKey, exact_multiple: bool) -> None:
    size = 4 * CHUNK if exact_multiple else 4 * CHUNK + 300
    blob = seal(plaintext(size), key)
    cut_points = [
        0,
        5,
        len(MAGIC),
        HEADER_SIZE - 1,
        HEADER_SIZE,  # header only
        HEADER_SIZE + 10,
        HEADER_SIZE + SEALED,  # chunk boundaries: the cut file still "looks" whole
        HEADER_SIZE + 2 * SEALED,
        HEADER_SIZE + 3 * SEALED,
        HEADER_SIZE + 3 * SEALED + 1,
        len(blob) - 16,
        len(blob) - 1,
    ]
    for cut in cut_points:
        with pytest.raises(IntegrityError):
            decrypt_bytes(blob[:cut], key)


@pytest.mark.parametrize("size", [0, 300, 2 * CHUNK, 2 * CHUNK + 300])
def test_appended_bytes_are_rejected(key: MasterKey, size: int) -> None:
    blob = seal(plaintext(size), key)
    last = chunks_of(blob)[-1]
    for extra in [b"\x00", b"x" * 16, b"y" * SEALED, last, os.urandom(3 * SEALED)]:
        with pytest.raises(IntegrityError):
            decrypt_bytes(blob + extra, key)


def test_swapped_chunks_are_rejected(key: MasterKey) -> None:
    blob = seal(plaintext(4 * CHUNK + 10), key)
    chunks = chunks_of(blob)
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    with pytest.raises(IntegrityError, match="chunk 0"):
        decrypt_bytes(blob[:HEADER_SIZE] + b"".join(swapped), key)


def test_dropped_chunk_is_rejected(key: MasterKey) -> None:
    blob = seal(plaintext(4 * CHUNK + 10), key)
    chunks = chunks_of(blob)
    with pytest.raises(IntegrityError):
        decrypt_bytes(blob[:HEADER_SIZE] + b"".join([chunks[0], *chunks[2:]]), key)


def test_final_chunk_moved_to_the_middle_is_rejected(key: MasterKey) -> None:
    blob = seal(plaintext(3 * CHUNK), key)  # the final chunk is full-size
    chunks = chunks_of(blob)
    with pytest.raises(IntegrityError):
        decrypt_bytes(blob[:HEADER_SIZE] + chunks[0] + chunks[2] + chunks[1], key)


def test_chunk_transplanted_from_another_file_is_rejected(key: MasterKey) -> None:
    first = seal(plaintext(3 * CHUNK + 1, seed=1), key)
    second = seal(plaintext(3 * CHUNK + 1, seed=2), key)
    chunks = chunks_of(first)
    chunks[1] = chunks_of(second)[1]  # same position, same master key, other data key
    with pytest.raises(IntegrityError, match="chunk 1"):
        decrypt_bytes(first[:HEADER_SIZE] + b"".join(chunks), key)


def test_swapped_headers_are_rejected(key: MasterKey) -> None:
    first = seal(plaintext(2 * CHUNK, seed=1), key)
    second = seal(plaintext(2 * CHUNK, seed=2), key)
    for header_from, payload_from in [(first, second), (second, first)]:
        with pytest.raises(IntegrityError):
            decrypt_bytes(header_from[:HEADER_SIZE] + payload_from[HEADER_SIZE:], key)


def test_forged_chunk_size_is_rejected_even_with_a_valid_checksum(key: MasterKey) -> None:
    blob = seal(plaintext(4 * CHUNK), key)
    for forged_size in [2 * CHUNK, 512, 2**31]:
        header = bytearray(blob[:HEADER_SIZE])
        header[17:21] = struct.pack(">I", forged_size)
        with pytest.raises(IntegrityError):
            decrypt_bytes(with_valid_checksum(bytes(header)) + blob[HEADER_SIZE:], key)


def test_forged_key_id_with_valid_checksum_is_a_key_error(key: MasterKey) -> None:
    blob = seal(b"data", key)
    header = bytearray(blob[:HEADER_SIZE])
    header[KEY_ID_SLICE] = bytes(8)
    with pytest.raises(KeyAccessError, match="0000000000000000"):
        decrypt_bytes(with_valid_checksum(bytes(header)) + blob[HEADER_SIZE:], key)


def test_header_claiming_our_key_id_but_wrapped_by_another_key_is_corrupt(
    key: MasterKey,
) -> None:
    blob = seal(b"data", MasterKey.generate())
    header = bytearray(blob[:HEADER_SIZE])
    header[KEY_ID_SLICE] = bytes.fromhex(key.key_id)
    with pytest.raises(IntegrityError, match="data key"):
        decrypt_bytes(with_valid_checksum(bytes(header)) + blob[HEADER_SIZE:], key)


def test_foreign_file_is_not_our_format(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "records.csv"
    path.write_bytes(b"name,email\nalice,alice@example.org\n" * 10)
    assert not is_encrypted(path)
    with pytest.raises(IntegrityError, match="not a personanet encrypted file"):
        read_header(path)
    with pytest.raises(IntegrityError):
        read_encrypted_file(path, key)


def test_unknown_version_is_rejected(key: MasterKey) -> None:
    blob = bytearray(seal(b"x", key))
    blob[len(MAGIC)] = 2
    with pytest.raises(IntegrityError, match="version 2"):
        decrypt_bytes(bytes(blob), key)


# --------------------------------------------------------------------------- keys & files


def test_wrong_key_gives_key_access_error_naming_both_ids(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "collect.penc"
    write_encrypted_file(path, b"secret rows", key)
    other = MasterKey.generate()
    with pytest.raises(KeyAccessError) as err:
        read_encrypted_file(path, other)
    message = str(err.value)
    assert str(path) in message and key.key_id in message and other.key_id in message
    assert other.to_base64() not in message and key.to_base64() not in message


def test_encrypted_file_roundtrip_from_pieces(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "data.penc"
    pieces = [plaintext(700, seed=i) for i in range(200)]
    write_encrypted_file(path, iter(pieces), key)
    assert is_encrypted(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    header = read_header(path)
    assert isinstance(header, Header) and header.key_id == key.key_id
    assert read_encrypted_file(path, key) == b"".join(pieces)


def test_missing_input_is_reported_as_missing(tmp_path: Path, key: MasterKey) -> None:
    missing = tmp_path / "nope.penc"
    for call in (
        lambda: read_encrypted_file(missing, key),
        lambda: read_header(missing),
        lambda: is_encrypted(missing),
        lambda: decrypt_file_to(missing, tmp_path / "out", key),
    ):
        with pytest.raises(InputMissingError):
            call()


def test_decrypt_file_to_writes_the_plaintext(tmp_path: Path, key: MasterKey) -> None:
    data = plaintext(200_000)
    write_encrypted_file(tmp_path / "model.penc", data, key)
    decrypt_file_to(tmp_path / "model.penc", tmp_path / "model.bin", key)
    assert (tmp_path / "model.bin").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.penc"]


@pytest.mark.parametrize("damage", ["flip_last_byte", "truncate", "wrong_key"])
def test_decrypt_file_to_leaves_no_output_on_failure(
    tmp_path: Path, key: MasterKey, damage: str
) -> None:
    source = tmp_path / "in.penc"
    write_encrypted_file(source, plaintext(200_000), key)
    blob = bytearray(source.read_bytes())
    opener = key
    if damage == "flip_last_byte":  # fails only after most plaintext was written out
        blob[-1] ^= 1
    elif damage == "truncate":
        blob = blob[: len(blob) - 100]
    else:
        opener = MasterKey.generate()
    source.write_bytes(bytes(blob))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises((IntegrityError, KeyAccessError)):
        decrypt_file_to(source, out_dir / "plain.bin", opener)
    assert list(out_dir.iterdir()) == []


def test_rewrap_moves_file_to_new_key_without_touching_payload(
    tmp_path: Path, key: MasterKey
) -> None:
    path = tmp_path / "data.penc"
    data = plaintext(5 * 1024 + 3)
    write_encrypted_file(path, data, key)
    before = path.read_bytes()
    new = MasterKey.generate()

    rewrap_file(path, key, new)

    after = path.read_bytes()
    assert after[HEADER_SIZE:] == before[HEADER_SIZE:]
    assert after[:HEADER_SIZE] != before[:HEADER_SIZE]
    assert read_header(path).key_id == new.key_id
    assert read_encrypted_file(path, new) == data
    with pytest.raises(KeyAccessError, match=new.key_id):
        read_encrypted_file(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["data.penc"]


def test_rewrap_twice_is_idempotent(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "data.penc"
    write_encrypted_file(path, b"rows", key)
    new = MasterKey.generate()
    rewrap_file(path, key, new)
    once = path.read_bytes()
    inode = path.stat().st_ino
    rewrap_file(path, key, new)
    assert path.read_bytes() == once and path.stat().st_ino == inode
    assert read_encrypted_file(path, new) == b"rows"


def test_rewrap_resumes_over_a_leftover_temporary(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "data.penc"
    write_encrypted_file(path, b"rows", key)
    (tmp_path / "data.penc.rewrap-tmp").write_bytes(b"half a file from a killed rotation")
    new = MasterKey.generate()
    rewrap_file(path, key, new)
    assert read_encrypted_file(path, new) == b"rows"
    assert [p.name for p in tmp_path.iterdir()] == ["data.penc"]


def test_rewrap_with_a_wrong_old_key_changes_nothing(tmp_path: Path, key: MasterKey) -> None:
    path = tmp_path / "data.penc"
    write_encrypted_file(path, b"rows", key)
    before = path.read_bytes()
    with pytest.raises(KeyAccessError):
        rewrap_file(path, MasterKey.generate(), MasterKey.generate())
    assert path.read_bytes() == before


def test_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    key = MasterKey.generate()
    old_umask = os.umask(0)  # a permissive umask must not widen the mode
    try:
        write_key_file(path, key)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# personanet master key, id {key.key_id}, created ")
    assert lines[1] == key.to_base64()

    with pytest.raises(OutputError, match="already exists"):
        write_key_file(path, MasterKey.generate())
    assert load_master_key({"PERSONANET_KEY_FILE": str(path)}) == key


def test_key_file_parsing_ignores_comments_and_blank_lines(tmp_path: Path) -> None:
    key = MasterKey.generate()
    path = tmp_path / "k"
    path.write_text(f"# a comment\n\n  {key.to_base64()}  \n# another\n")
    path.chmod(0o600)
    assert load_master_key({"PERSONANET_KEY_FILE": str(path)}) == key


def test_key_file_takes_precedence_over_key_variable(tmp_path: Path) -> None:
    from_file, from_env = MasterKey.generate(), MasterKey.generate()
    path = tmp_path / "master.key"
    write_key_file(path, from_file)
    environ = {"PERSONANET_KEY_FILE": str(path), "PERSONANET_KEY": from_env.to_base64()}
    assert load_master_key(environ) == from_file
    assert load_master_key({"PERSONANET_KEY": from_env.to_base64()}) == from_env


def test_load_master_key_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    key = MasterKey.generate()
    monkeypatch.delenv("PERSONANET_KEY_FILE", raising=False)
    monkeypatch.setenv("PERSONANET_KEY", key.to_base64())
    assert load_master_key() == key


def test_missing_key_says_how_to_make_one() -> None:
    with pytest.raises(KeyAccessError) as err:
        load_master_key({})
    assert str(err.value) == (
        "no key: set PERSONANET_KEY_FILE to a key file made by "
        "`personanet keys generate PATH`, or PERSONANET_KEY"
    )


def test_key_errors_never_echo_key_material(tmp_path: Path) -> None:
    secret = MasterKey.generate().to_base64()
    near_misses = [secret[:-4], secret + "AAAA", secret.replace("A", "*") + "!", secret[:20]]
    for bad in near_misses:
        with pytest.raises(KeyAccessError) as err:
            load_master_key({"PERSONANET_KEY": bad})
        assert bad not in str(err.value) and secret[:20] not in str(err.value)
        assert "PERSONANET_KEY" in str(err.value)
        assert err.value.__cause__ is None and err.value.__suppress_context__

        path = tmp_path / "bad.key"
        path.write_text(f"# comment\n{bad}\n")
        path.chmod(0o600)
        with pytest.raises(KeyAccessError) as err:
            load_master_key({"PERSONANET_KEY_FILE": str(path)})
        assert str(path) in str(err.value) and "malformed" in str(err.value)
        assert secret[:20] not in str(err.value)


@pytest.mark.parametrize("problem", ["missing", "directory", "unreadable", "two_keys", "binary"])
def test_bad_key_file_names_the_path(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "master.key"
    if problem == "directory":
        path.mkdir()
    elif problem == "unreadable":
        write_key_file(path, MasterKey.generate())
        path.chmod(0)
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
    elif problem == "two_keys":
        path.write_text(f"{MasterKey.generate().to_base64()}\n{MasterKey.generate().to_base64()}\n")
    elif problem == "binary":
        path.write_bytes(os.urandom(64))
    with pytest.raises(KeyAccessError, match=str(path)):
        load_master_key({"PERSONANET_KEY_FILE": str(path), "PERSONANET_KEY": ""})


def test_group_readable_key_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = MasterKey.generate()
    path = tmp_path / "master.key"
    write_key_file(path, key)
    with caplog.at_level(logging.WARNING, logger="personanet"):
        load_master_key({"PERSONANET_KEY_FILE": str(path)})
    assert not caplog.records

    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="personanet"):
        assert load_master_key({"PERSONANET_KEY_FILE": str(path)}) == key
    assert any("chmod 600" in r.getMessage() for r in caplog.records)
    assert all(key.to_base64() not in r.getMessage() for r in caplog.records)


def test_repr_shows_key_id_only() -> None:
    key = MasterKey.generate()
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert key.to_base64() not in text
        assert key.material.hex() not in text and repr(key.material) not in text
        assert key.key_id in text


def test_key_id_is_stable_short_hex_and_distinct() -> None:
    key = MasterKey(bytes(range(32)))
    assert key.key_id == MasterKey(bytes(range(32))).key_id
    assert len(key.key_id) == 16 and key.key_id == key.key_id.lower()
    int(key.key_id, 16)
    assert key.key_id != MasterKey.generate().key_id
    assert key.key_id not in key.material.hex()


def test_base64_roundtrip_and_malformed_keys() -> None:
    key = MasterKey.generate()
    assert MasterKey.from_base64(key.to_base64()) == key
    assert MasterKey.from_base64(f"  {key.to_base64()}\n") == key
    for bad in ["", "not base64!", "QUJD", key.to_base64()[:-2]]:
        with pytest.raises(KeyAccessError, match="base64 of 32 bytes"):
            MasterKey.from_base64(bad)
    with pytest.raises(KeyAccessError):
        MasterKey(b"short")


def test_derived_keys_are_separated_by_purpose() -> None:
    key = MasterKey.generate()
    pseudonym, kek = key.derive("pseudonym"), key.derive("kek")
    assert len(pseudonym) == 32 and len(key.derive("pseudonym", 64)) == 64
    assert pseudonym != kek and pseudonym == key.derive("pseudonym")
    assert pseudonym != MasterKey.generate().derive("pseudonym")
    assert key.material not in (pseudonym, kek)
    with pytest.raises(ValueError):
        key.derive("key-id")
