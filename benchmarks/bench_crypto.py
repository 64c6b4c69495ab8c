"""Throughput and memory of the encrypted file format against a plain streaming copy.

Usage: python benchmarks/bench_crypto.py [--size-mib N] [--repeat R] [--dir DIR]

Encrypts an N MiB generated stream to a file, decrypts it streaming into a SHA-256
hasher, and decrypts it file to file (``decrypt_file_to``: a temporary file, fsynced,
renamed). The same bytes are also written, read back into the same hasher and copied
to a fsynced file plainly, on the same machine in the same run, so the *ratio* is the
figure to quote: absolute speeds on a shared machine are noise. Each phase runs
``--repeat`` times, interleaved, and the best time is kept. Files go through the page
cache, so all but the file-to-file pair (which fsync, like ``decrypt_file_to``) are
CPU cost, not disk speed; each writing phase starts with no dirty pages left by another.

Peak memory is the process's peak RSS (``ru_maxrss``, interpreter and libraries
included) after all phases, plus the Python-heap peak (``tracemalloc``) of one extra,
untimed encrypt + decrypt pass. The run fails if peak RSS reaches 100 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

MIB = 1024 * 1024
RSS_LIMIT_MIB = 100.0


def generated_stream(block: bytes, count: int) -> Iterator[bytes]:
    # One random block repeated: generating fresh random bytes would dominate the timing.
    for _ in range(count):
        yield block


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def settle(path: Path) -> None:
    """Start a writing phase on a quiet page cache: no earlier output to free, and no
    other phase's dirty pages that throttling or a journal commit would make it write."""
    path.unlink(missing_ok=True)
    os.sync()


def timed(action: Callable[[], object], results: list[float]) -> None:
    start = time.perf_counter()
    action()
    results.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    # Imported here so the script runs from a checkout without installing the package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cryptography

    from personanet.store.crypto import (
        DEFAULT_CHUNK_SIZE,
        decrypt_file_to,
        decrypt_stream,
        encrypt_stream,
    )
    from personanet.store.crypto_header import HEADER_SIZE
    from personanet.store.keys import MasterKey

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="plaintext size (MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per phase; best kept")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bytes")
    parser.add_argument("--dir", type=Path, default=None, help="where the temp files go")
    args = parser.parse_args(argv)

    key = MasterKey.generate()
    block = os.urandom(MIB)
    size = args.size_mib * MIB
    chunk = args.chunk_size
    timings: dict[str, list[float]] = {
        "plain write": [],
        "encrypt": [],
        "plain read + sha256": [],
        "decrypt + sha256": [],
        "plain copy + fsync": [],
        "decrypt to file": [],
    }
    digests: dict[str, str] = {}

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-crypto-") as tmp:
        plain_path, sealed_path = Path(tmp) / "plain.bin", Path(tmp) / "sealed.penc"
        copy_path = Path(tmp) / "copy.bin"

        def plain_write() -> None:
            with open(plain_path, "wb") as f:
                f.writelines(generated_stream(block, args.size_mib))

        def encrypt() -> None:
            with open(sealed_path, "wb") as f:
                encrypt_stream(generated_stream(block, args.size_mib), f, key, chunk_size=chunk)

        def plain_read(path: Path = plain_path, name: str = "plain") -> None:
            hasher = hashlib.sha256()
            with open(path, "rb") as f:
                while piece := f.read(chunk):
                    hasher.update(piece)
            digests[name] = hasher.hexdigest()

        def decrypt() -> None:
            hasher = hashlib.sha256()
            with open(sealed_path, "rb") as f:
                for piece in decrypt_stream(f, key):
                    hasher.update(piece)
            digests["decrypted"] = hasher.hexdigest()

        def plain_copy() -> None:
            with open(plain_path, "rb") as src, open(copy_path, "wb") as dst:
                while piece := src.read(MIB):
                    dst.write(piece)
                dst.flush()
                os.fsync(dst.fileno())

        def decrypt_to_file() -> None:
            decrypt_file_to(sealed_path, copy_path, key)

        for _ in range(args.repeat):
            settle(plain_path)
            timed(plain_write, timings["plain write"])
            settle(sealed_path)
            timed(encrypt, timings["encrypt"])
            timed(plain_read, timings["plain read + sha256"])
            timed(decrypt, timings["decrypt + sha256"])
            settle(copy_path)
            timed(decrypt_to_file, timings["decrypt to file"])
            plain_read(copy_path, "decrypted to file")
            settle(copy_path)
            timed(plain_copy, timings["plain copy + fsync"])
        if not digests["plain"] == digests["decrypted"] == digests["decrypted to file"]:
            print("FAIL: decrypted bytes differ from the plaintext", file=sys.stderr)
            return 1
        sealed_bytes = sealed_path.stat().st_size
        rss_after_timed = peak_rss_mib()

        tracemalloc.start()
        encrypt()
        decrypt()
        _, heap_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    best = {phase: min(times) for phase, times in timings.items()}
    rss = peak_rss_mib()
    overhead = sealed_bytes - size

    print(
        f"personanet crypto: {args.size_mib} MiB, chunk {chunk // 1024} KiB, AES-256-GCM, "
        f"cryptography {cryptography.__version__}, Python {platform.python_version()}, "
        f"best of {args.repeat}"
    )
    print(f"{'phase':<22}{'seconds':>9}{'MiB/s':>9}{'GB/s':>7}{'x plain':>9}")
    baselines = {"encrypt": "plain write", "decrypt + sha256": "plain read + sha256",
                 "decrypt to file": "plain copy + fsync"}
    for phase, seconds in best.items():
        ratio = f"{seconds / best[baselines[phase]]:.2f}" if phase in baselines else "1.00"
        print(f"{phase:<22}{seconds:>9.3f}{args.size_mib / seconds:>9.0f}"
              f"{size / seconds / 1e9:>7.2f}{ratio:>9}")
    print(
        f"ciphertext overhead: {overhead} B ({HEADER_SIZE} B header + 16 B per chunk, "
        f"{100 * overhead / max(size, 1):.3f} %)"
    )
    print(
        f"peak RSS: {rss:.1f} MiB after timed phases {rss_after_timed:.1f} MiB "
        f"(limit {RSS_LIMIT_MIB:.0f}); Python heap peak, one traced pass: "
        f"{heap_peak / MIB:.2f} MiB"
    )
    if rss >= RSS_LIMIT_MIB:
        print(f"FAIL: peak RSS {rss:.1f} MiB >= {RSS_LIMIT_MIB:.0f} MiB", file=sys.stderr)
        return 1
    print("memory OK: flat, independent of file size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
