"""The master key never leaves the place the user put it.

A tiny real pipeline (400 records, 1 epoch) runs in a child process while its
command line and environment are read from /proc, then every read-only and error
path runs in-process: text and JSON logs, --debug, --json, `budget show`,
`artifacts list/show/verify`, `keys rotate`, wrong / malformed keys and tampered
files. Every byte produced (each file under the artifact root, each stdout and
stderr) is searched for the key in every encoding someone might print it in, and
for the subkeys derived from it; only the public key id may appear.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from personanet.errors import KeyAccessError
from personanet.privacy.pseudonym import pseudonym_key
from personanet.store.keys import MasterKey, load_master_key, write_key_file

from .conftest import ROOT, all_bytes_under, write_config

PIPELINE_OVERRIDES = f"""
[train]
epochs = 1
batch_size = 64
[evaluate]
min_accuracy = 0.0
bootstrap = 20
[predict]
source = "{ROOT / "data" / "persona_new.csv"}"
"""


def encodings(secret: bytes) -> set[bytes]:
    """The forms a 32-byte secret would take if printed, logged or serialised."""
    b64 = base64.b64encode(secret)
    forms = {secret, secret.hex().encode(), secret.hex().upper().encode(), b64,
             base64.urlsafe_b64encode(secret), b64.rstrip(b"="), base64.b32encode(secret),
             repr(secret).encode(), json.dumps(list(secret)).encode()}
    # A JSON string escapes "/" as "\/" in some writers; base64 may contain "/".
    forms.add(b64.replace(b"/", b"\\/"))
    return forms


def subkeys(key: MasterKey) -> list[bytes]:
    return [key.material, key.derive("kek"), pseudonym_key(key)]


def secret_forms(key: MasterKey) -> set[bytes]:
    return {form for secret in subkeys(key) for form in encodings(secret)}


def secret_fragments(key: MasterKey) -> set[bytes]:
    """Every 48-bit piece of the key's base64 and hex forms: a partial key is a leak too.

    Only for text (logs, messages, JSON): in ciphertext and weights, 8 random bytes
    would match some base64 piece too often to mean anything.
    """
    pieces: set[bytes] = set()
    for secret in subkeys(key):
        for text, width in ((base64.b64encode(secret).rstrip(b"="), 8),
                            (base64.urlsafe_b64encode(secret).rstrip(b"="), 8),
                            (secret.hex().encode(), 12), (secret.hex().upper().encode(), 12)):
            pieces |= {text[i : i + width] for i in range(len(text) - width + 1)}
    return pieces


def assert_no_secret(data: bytes | str, key: MasterKey, where: str, *, text: bool = True
                     ) -> None:
    """No form of the key (or, in text, no 48-bit piece of one) in `data`."""
    blob = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    found = [form for form in secret_forms(key) if form in blob]
    assert not found, f"key material in {where}"
    if text:
        pieces = [piece for piece in secret_fragments(key) if piece in blob]
        assert not pieces, f"part of the key in {where}: {pieces[:3]}"


TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".csv", ".toml", ".txt", ".lock")


def assert_no_secret_under(root: Path, key: MasterKey) -> None:
    """Whole keys nowhere under `root`, and not even pieces of them in its text files."""
    assert_no_secret(all_bytes_under(root), key, str(root), text=False)
    for path in root.rglob("*"):
        if path.is_file() and path.name.endswith(TEXT_SUFFIXES):
            assert_no_secret(path.read_bytes(), key, str(path))


@pytest.fixture
def pipeline_config(tmp_path: Path, small_csv: Path) -> Path:
    return write_config(tmp_path / "persona.toml", small_csv, overrides=PIPELINE_OVERRIDES)


def spy_on_git(folder: Path, log: Path) -> Path:
    """A `git` for PATH that appends its argv and environment to `log`, then runs git."""
    folder.mkdir()
    real = shutil.which("git")
    run_real = f'exec "{real}" "$@"' if real else "exit 1"
    script = folder / "git"
    script.write_text(
        "#!/bin/sh\n"
        f"{{ printf '\\0--record--\\0'; printf '%s\\0' \"$@\"; "
        f"printf '\\0--environ--\\0'; cat /proc/$$/environ; }} >> '{log}'\n"
        f"{run_real}\n"
    )
    script.chmod(0o755)
    log.write_bytes(b"")
    return folder


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    found = [int(c) for c in text.split()]
    return found + [g for c in found for g in children(c)]


def read_proc(pid: int, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # the process ended between listing and reading
        return None


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_running_pipeline_keeps_the_key_out_of_ps_and_out_of_every_byte_it_writes(
        tmp_path: Path, pipeline_config: Path, key: MasterKey) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PERSONANET_KEY_FILE", "PERSONANET_KEY")}
    env["PERSONANET_KEY"] = key.to_base64()
    env["PYTHONPATH"] = str(ROOT)
    # Children too short-lived for polling (`git rev-parse` for the manifest) go through
    # a stand-in on PATH that records their argv and environment, then runs the real one.
    spawned = tmp_path / "spawned.log"
    env["PATH"] = f"{spy_on_git(tmp_path / 'bin', spawned)}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "personanet", "--debug", "--log-format", "json",
           "--config", str(pipeline_config), "run", "--device", "cpu"]
    samples = 0
    with subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        # What `ps` shows: the command line of the process and of anything it starts.
        # Its environment may hold the key only in the variable the user set.
        outputs: dict[str, bytes] = {}
        readers = [threading.Thread(target=lambda n=n, s=s: outputs.__setitem__(n, s.read()))
                   for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        for reader in readers:
            reader.start()
        while proc.poll() is None:
            for pid in [proc.pid, *children(proc.pid)]:
                cmdline, environ = read_proc(pid, "cmdline"), read_proc(pid, "environ")
                if cmdline is None or environ is None:
                    continue
                samples += 1
                assert_no_secret(cmdline, key, f"/proc/{pid}/cmdline")
                others = [e for e in environ.split(b"\0")
                          if not e.startswith(b"PERSONANET_KEY=")]
                assert_no_secret(b"\0".join(others), key, f"/proc/{pid}/environ")
            time.sleep(0.05)
        for reader in readers:
            reader.join()
    assert proc.returncode == 0, outputs["stderr"].decode()[-2000:]
    assert samples > 0, "the process was never observed running"
    records = spawned.read_bytes().split(b"\0--record--\0")
    assert len(records) > 1, "the git stand-in was never run: the check above saw nothing"
    for record in filter(None, records):
        argv, _, environ = record.partition(b"\0--environ--\0")
        assert_no_secret(argv, key, "the argv of a child process")
        others = [e for e in environ.split(b"\0") if not e.startswith(b"PERSONANET_KEY=")]
        assert_no_secret(b"\0".join(others), key, "the environment of a child process")

    stdout, stderr = outputs["stdout"], outputs["stderr"]
    for stage in ("collect", "clean", "train", "evaluate", "predict"):
        assert stage.encode() in stdout
    assert key.key_id.encode() in all_bytes_under(tmp_path / "artifacts")
    assert_no_secret(stdout, key, "stdout of run")
    assert_no_secret(stderr, key, "stderr of run --debug --log-format json")
    assert_no_secret_under(tmp_path / "artifacts", key)


def test_every_command_and_log_format_keeps_the_key_out_of_its_output(
        cli, key_env: MasterKey, tmp_path: Path, pipeline_config: Path) -> None:
    key = key_env
    transcript: list[str] = []

    def run(*args: str, expect: int = 0) -> str:
        result = cli(*args)
        assert result.code == expect, (args, result.stderr)
        transcript.extend([result.stdout, result.stderr])
        return result.stdout

    cfg = ("--config", str(pipeline_config))
    # Text and JSON logs, with and without --debug, a --json result, and a recompute.
    run("--debug", "--log-format", "text", *cfg, "run", "--device", "cpu")
    run("--json", *cfg, "run", "--device", "cpu")
    run("--debug", "--log-format", "json", *cfg, "predict", "--force")
    run("--debug", "--log-format", "text", "--json", *cfg, "evaluate", "--force")

    listed = json.loads(run("--json", *cfg, "artifacts", "list"))["artifacts"]
    assert {a["stage"] for a in listed} == {"collect", "clean", "train", "evaluate", "predict"}
    run(*cfg, "artifacts", "list")
    for artifact in listed:
        shown = run(*cfg, "artifacts", "show", artifact["version"])
        run("--json", *cfg, "artifacts", "show", artifact["version"])
        manifest = json.loads(shown)
        for out in manifest["outputs"]:
            if out["encrypted"]:
                assert out["key_id"] == key.key_id  # the name of the key, never the key
    run(*cfg, "artifacts", "verify")
    run("--json", *cfg, "artifacts", "verify")
    run(*cfg, "budget", "show")
    run("--json", *cfg, "budget", "show")

    # A rotation handles two keys at once: neither may show.
    new = MasterKey.generate()
    write_key_file(tmp_path / "new.key", new)
    rotated = run("--debug", "--json", "keys", "rotate", "--new-key-file",
                  str(tmp_path / "new.key"))
    assert json.loads(rotated)["new_key_id"] == new.key_id

    produced = "".join(transcript)
    assert key.key_id in produced and new.key_id in produced
    for secret in (key, new):
        assert_no_secret(produced, secret, "command output")
        assert_no_secret_under(tmp_path / "artifacts", secret)


def test_key_errors_name_the_key_id_never_the_key(cli, key_env: MasterKey, tmp_path: Path,
                                                   small_config: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    key = key_env
    collected = cli("--json", "--config", small_config, "collect")
    assert collected.code == 0
    records = Path(collected.json()["path"]) / "records.parquet.enc"

    # A wrong key: both ids named, neither key shown.
    wrong = MasterKey.generate()
    monkeypatch.setenv("PERSONANET_KEY", wrong.to_base64())
    for flags in ((), ("--debug",), ("--log-format", "json"), ("--json", "--debug")):
        result = cli(*flags, "--config", small_config, "clean")
        assert result.code == 77
        assert key.key_id in result.stderr and wrong.key_id in result.stderr
        for secret in (key, wrong):
            assert_no_secret(result.stdout + result.stderr, secret, f"clean {flags}")

    # A malformed key is usually a near miss of the real one: never echo it.
    text = key.to_base64()
    near_misses = [text[:-2], text + "AAAA", text.replace(text[5], "!" if text[5] != "!" else "?"),
                   key.material.hex(), text[:20] + "\n" + text[20:], " ".join(text)]
    for bad in near_misses:
        monkeypatch.setenv("PERSONANET_KEY", bad)
        with pytest.raises(KeyAccessError) as caught:
            load_master_key()
        for flags in ((), ("--debug", "--log-format", "json"), ("--json",)):
            result = cli(*flags, "--config", small_config, "clean")
            assert result.code == 77
            output = result.stdout + result.stderr + str(caught.value)
            assert bad.strip() not in output and text not in output
            assert_no_secret(output, key, "a malformed-key error")

    # A tampered file, read with the right key, with tracebacks on.
    monkeypatch.setenv("PERSONANET_KEY", text)
    data = bytearray(records.read_bytes())
    data[-10] ^= 0x01
    records.write_bytes(bytes(data))
    for args in (("--debug", "clean"), ("--debug", "--log-format", "json", "artifacts", "verify")):
        result = cli("--config", small_config, *args)
        assert result.code == 65
        assert_no_secret(result.stdout + result.stderr, key, f"{args} on a tampered file")
    assert_no_secret_under(tmp_path / "artifacts", key)


def test_key_file_path_not_its_content_is_what_errors_and_logs_show(
        cli, tmp_path: Path, small_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = MasterKey.generate()
    key_file = tmp_path / "master.key"
    write_key_file(key_file, key)
    monkeypatch.delenv("PERSONANET_KEY", raising=False)
    monkeypatch.setenv("PERSONANET_KEY_FILE", str(key_file))
    key_file.chmod(0o644)  # group/world readable: warned about, by path
    result = cli("--debug", "--config", small_config, "collect")
    assert result.code == 0
    assert str(key_file) in result.stderr
    assert_no_secret(result.stdout + result.stderr, key, "collect with a key file")

    # A key file with a damaged line: the error names the path, not the line.
    damaged = tmp_path / "damaged.key"
    damaged.write_text(f"# personanet master key\n{key.to_base64()[:-3]}\n")
    monkeypatch.setenv("PERSONANET_KEY_FILE", str(damaged))
    result = cli("--debug", "--json", "--config", small_config, "artifacts", "verify")
    assert result.code == 77 and str(damaged) in result.stderr
    assert key.to_base64()[:-3] not in result.stdout + result.stderr
    assert_no_secret(result.stdout + result.stderr, key, "a damaged key file error")
    assert_no_secret_under(tmp_path / "artifacts", key)
