"""`personanet serve`: a real server on a loopback port, a real HTTP client.

The server runs as `python -m personanet serve` in a child process over a tiny
private root (tests/store_trust.py), with age's invalid and out-of-bounds values
quarantined so that a record can break a rule. Checked: the bearer token (401),
body and batch limits (413), rule violations named without the value (422), the
same scores as `personanet predict` for the same rows, no identifier or body in
the logs, the refusal of a non-private model, and a reload under load (SIGHUP, or
the `--watch` poll) that drops no request.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from personanet.cli import run_cli

from .store_trust import TINY, Built, build, copy_of, use_key

TOKEN = "test-token-0123456789abcdef"
#: age's bad values are refused rather than imputed or clipped: a record can break a rule
STRICT = TINY + """
[columns.age]
invalid = "quarantine"
out_of_bounds = "quarantine"
"""


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def call(self, method: str, path: str, body: object = None, *, token: str | None = TOKEN,
             raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         method=method)
        request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def logs(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(built: Built, root: Path, log: Path, *args: str) -> Server:
    """`personanet serve` in a child process, once /healthz answers."""
    port = free_port()
    env = {**os.environ, "PERSONANET_KEY": built.key.to_base64(),
           "PERSONANET_SERVE_TOKEN": TOKEN}
    env.pop("PERSONANET_KEY_FILE", None)
    with open(log, "wb") as fh:
        process = subprocess.Popen(
            [sys.executable, "-m", "personanet", "--config", str(built.config), "--artifacts",
             str(root), "serve", "--port", str(port), *args],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=built.folder)
    server = Server(process, port, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return server
        try:
            if server.call("GET", "/healthz")[0] == 200:
                return server
        except OSError:
            time.sleep(0.2)
    stop(server)
    raise AssertionError(f"the server did not start: {server.logs()}")


def stop(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def records(built: Built, n: int) -> list[dict[str, str]]:
    with open(built.csv, encoding="utf-8", newline="") as fh:
        return [row for _, row in zip(range(n), csv.DictReader(fh), strict=False)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("serve"), overrides=STRICT)


@pytest.fixture(scope="module")
def server(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start(built, built.folder / "artifacts",
                    tmp_path_factory.mktemp("serve-log") / "serve.log",
                    "--max-batch", "8", "--max-body", "20000")
    yield running
    stop(running)


def test_every_request_needs_the_token(server: Server) -> None:
    for path in ("/healthz", "/v1/model"):
        assert server.call("GET", path, token=None)[0] == 401
        assert server.call("GET", path, token=TOKEN + "x")[0] == 401
        assert server.call("GET", path, token=TOKEN[:-1])[0] == 401
        assert server.call("GET", path)[0] == 200
    assert server.call("POST", "/v1/predict", {"age": "40"}, token="wrong-token")[0] == 401


def test_model_names_version_privacy_and_gates(server: Server, built: Built) -> None:
    status, body = server.call("GET", "/v1/model")
    assert status == 200
    assert body["version"] == built.versions["train"]
    assert body["private"] is True
    assert 0 < body["epsilon"] <= 1.0 and body["delta"] == 1e-5
    assert body["evaluation"] == built.versions["evaluate"]
    assert "min_accuracy" in body["gates_passed"]


def test_body_and_batch_limits(server: Server, built: Built) -> None:
    status, body = server.call("POST", "/v1/predict", raw=b'{"records": [' + b" " * 30000 + b"]}")
    assert status == 413
    status, body = server.call("POST", "/v1/predict", {"records": records(built, 9)})
    assert status == 413 and body["records"] == 9
    assert server.call("POST", "/v1/predict", {"records": records(built, 8)})[0] == 200


def test_rule_violations_name_the_column_never_the_value(server: Server, built: Built) -> None:
    secret = "age-secret-7731"
    good = records(built, 2)
    status, body = server.call("POST", "/v1/predict",
                               {"records": [good[0], {**good[1], "age": secret}]})
    assert status == 422
    assert body["problems"] == [{"row": 1, "column": "age", "rule": "invalid_value"}]
    assert secret not in json.dumps(body)
    status, body = server.call("POST", "/v1/predict", {**good[0], "age": "250"})
    assert status == 422 and body["problems"][0]["rule"] == "out_of_bounds"
    assert "250" not in json.dumps(body)
    status, body = server.call("POST", "/v1/predict", {**good[0], "education": [secret]})
    assert status == 422 and body["problems"][0]["column"] == "education"
    assert secret not in json.dumps(body)
    assert server.call("POST", "/v1/predict", raw=b"not json")[0] == 422
    assert server.call("POST", "/v1/predict", ["a", "list"])[0] == 422
    assert secret not in server.logs()


def test_scores_are_predicts(server: Server, built: Built, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    rows = records(built, 8)
    status, body = server.call("POST", "/v1/predict", {"records": rows})
    assert status == 200 and body["model_version"] == built.versions["train"]
    single = server.call("POST", "/v1/predict", rows[3])[1]["predictions"][0]

    root = copy_of(built, tmp_path)
    source = tmp_path / "rows.csv"
    with open(source, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    use_key(monkeypatch, built.key)
    output = tmp_path / "out.csv"
    assert run_cli(["--quiet", "--config", str(built.config), "--artifacts", str(root),
                    "predict", "--input", str(source), "--output", str(output),
                    "--plaintext-output"]) == 0
    with open(output, encoding="utf-8", newline="") as fh:
        expected = list(csv.DictReader(fh))
    served = body["predictions"]
    assert len(served) == len(expected) == 8
    for got, want in zip(served, expected, strict=True):
        assert set(got) == set(want)
        for column, value in want.items():
            if column.startswith("proba_"):
                assert got[column] == pytest.approx(float(value), abs=1e-6)
            else:
                assert str(got[column]) == value, column
    # One record alone scores as it does among others (the forward's batch size aside).
    assert single == pytest.approx({**served[3], "row": 0}, abs=1e-6)


def test_no_identifier_or_body_in_the_logs(server: Server, built: Built) -> None:
    rows = records(built, 5)
    assert server.call("POST", "/v1/predict", {"records": rows})[0] == 200
    server.call("POST", "/v1/predict", {"records": rows}, token=None)
    logs = server.logs()
    for row in rows:
        assert row["name"] not in logs and row["email"] not in logs
        assert row["email"].lower() not in logs
    access = [line for line in logs.splitlines() if "/v1/predict" in line]
    assert access, logs
    pattern = re.compile(r"^personanet: (GET|POST) /[\w/]+ \d{3} \d+\.\dms rows=\d+$")
    assert all(pattern.match(line) for line in access), access
    assert "POST /v1/predict 200" in logs and "rows=5" in logs


def test_a_non_private_model_is_refused_without_allow_no_dp(built: Built, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    root = copy_of(built, tmp_path)
    use_key(monkeypatch, built.key)
    assert run_cli(["--quiet", "--config", str(built.config), "--artifacts", str(root),
                    "--json", "train", "--no-dp"]) == 0
    no_dp = sorted((root / "persona" / "train").iterdir())[-1].name
    refused = start(built, root, tmp_path / "refused.log", "--model", no_dp)
    assert refused.process.wait(timeout=60) == 69
    assert "--allow-no-dp" in refused.logs()
    allowed = start(built, root, tmp_path / "allowed.log", "--model", no_dp, "--allow-no-dp")
    try:
        status, body = allowed.call("GET", "/v1/model")
        assert status == 200 and body["version"] == no_dp and body["private"] is False
    finally:
        stop(allowed)


def test_sighup_swaps_to_a_newer_gated_model_under_load(built: Built, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    swap_under_load(built, tmp_path, monkeypatch,
                    lambda running: running.process.send_signal(signal.SIGHUP))


def test_watch_swaps_to_a_newer_gated_model_under_load(built: Built, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--watch 0.3`: no signal, the poll finds the newer gated model by itself."""
    logs = swap_under_load(built, tmp_path, monkeypatch, lambda running: None, "--watch", "0.3")
    assert "no newer gated model" not in logs  # the poll is silent while nothing changes


def swap_under_load(built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    trigger: object, *args: str) -> str:
    """Four clients score without pause while a newer model is trained and evaluated, then
    `trigger(server)`; every request answers 200, by the old model or the new one."""
    root = copy_of(built, tmp_path)
    running = start(built, root, tmp_path / "reload.log", *args)
    statuses: list[int] = []
    versions: set[str] = set()
    done = threading.Event()
    rows = records(built, 4)

    def client() -> None:
        while not done.is_set():
            status, body = running.call("POST", "/v1/predict", {"records": rows})
            statuses.append(status)
            versions.add(body.get("model_version", ""))

    clients = [threading.Thread(target=client) for _ in range(4)]
    try:
        for thread in clients:
            thread.start()
        use_key(monkeypatch, built.key)
        base = ["--quiet", "--config", str(built.config), "--artifacts", str(root)]
        assert run_cli([*base, "train", "--force"]) == 0
        assert run_cli([*base, "evaluate"]) == 0
        newer = sorted((root / "persona" / "train").iterdir())[-1].name
        assert newer != built.versions["train"]
        trigger(running)  # type: ignore[operator]
        deadline = time.monotonic() + 30
        while running.call("GET", "/v1/model")[1]["version"] != newer:
            assert time.monotonic() < deadline, running.logs()
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        done.set()
        for thread in clients:
            thread.join()
        stop(running)
    assert statuses and set(statuses) == {200}
    assert versions == {built.versions["train"], newer}
    assert f"reloaded: {built.versions['train']} -> {newer}" in running.logs()
    return running.logs()


def test_no_server_without_a_strong_token(built: Built, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    use_key(monkeypatch, built.key)
    monkeypatch.delenv("PERSONANET_SERVE_TOKEN", raising=False)
    base = ["--config", str(built.config), "--artifacts", str(copy_of(built, tmp_path)), "serve",
            "--port", str(free_port())]
    assert run_cli(base) == 2
    assert "PERSONANET_SERVE_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("PERSONANET_SERVE_TOKEN", "short")
    assert run_cli(base) == 2
    assert run_cli([*base, "--token-file", str(tmp_path / "absent")]) == 77
