"""`personanet serve` with an image model: a real server on loopback, forms as base64 images.

A record's image column holds the image file (PNG here) as base64 text, whatever the
column's `image_source`; the server decodes it with clean's image rules. Checked on a
tiny forms root (the bundled digits, one epoch of the cnn): the same scores as
`personanet predict` on the same forms' manifest; a bad image (not base64, a text file,
the wrong size, RGBA for a grey column, a blank page, a truncated PNG, a path) refused
with 422 naming the column and clean's reason, never the value; no image bytes, file
names, names or emails in the server's log.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from personanet.cli import run_cli
from personanet.store.keys import MasterKey

from .conftest import _dump_toml
from .store_trust import Built, copy_of, use_key
from .test_serve import Server, start, stop

ROOT = Path(__file__).resolve().parents[1]
FORMS = ROOT / "data" / "forms"


def _forms_root(folder: Path) -> Built:
    """56 training and 24 test forms with their PNGs, one epoch of the cnn, `run` there."""
    data = folder / "forms"
    (data / "images").mkdir(parents=True)
    with (FORMS / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    chosen = ([r for r in rows if r["split"] == "train"][:56]
              + [r for r in rows if r["split"] == "test"][:24])
    _write_manifest(data / "manifest.csv", chosen)
    for row in chosen:
        shutil.copy(FORMS / row["image"], data / row["image"])
    config = tomllib.loads((ROOT / "configs" / "forms.toml").read_text(encoding="utf-8"))
    config["dataset"]["source"] = str(data / "manifest.csv")
    config["predict"]["source"] = str(data / "manifest.csv")
    config["train"].update(epochs=1, batch_size=16, validation_fraction=0.25)
    config["evaluate"] = {"bootstrap": 20, "min_group_size": 1}
    path = folder / "forms.toml"
    path.write_text(_dump_toml(config), encoding="utf-8")
    key = MasterKey.generate()
    with pytest.MonkeyPatch.context() as patch:
        use_key(patch, key)
        patch.chdir(folder)
        assert run_cli(["--quiet", "--config", str(path), "run"]) == 0
    versions = {stage: sorted((folder / "artifacts" / "forms" / stage).iterdir())[0].name
                for stage in ("train", "evaluate")}
    return Built(folder, path, data / "manifest.csv", key, versions)


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _manifest(built: Built) -> list[dict[str, str]]:
    with built.csv.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _record(built: Built, row: dict[str, str]) -> dict[str, str]:
    """A manifest row as a request's record: the PNG's bytes as base64 instead of its path."""
    png = (built.csv.parent / row["image"]).read_bytes()
    return {**row, "image": base64.b64encode(png).decode()}


def _png(array: object, mode: str) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")  # type: ignore[arg-type]
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _forms_root(tmp_path_factory.mktemp("serve-images"))


@pytest.fixture(scope="module")
def server(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start(built, built.folder / "artifacts",
                    tmp_path_factory.mktemp("serve-images-log") / "serve.log")
    yield running
    stop(running)


def test_an_image_model_is_served_after_its_gated_evaluation(server: Server,
                                                             built: Built) -> None:
    status, body = server.call("GET", "/v1/model")
    assert status == 200, server.logs()
    assert body["version"] == built.versions["train"] and body["private"] is True
    assert body["evaluation"] == built.versions["evaluate"]


def test_image_scores_are_predicts(server: Server, built: Built, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _manifest(built)[50:60]  # training and test forms alike
    status, body = server.call("POST", "/v1/predict",
                               {"records": [_record(built, r) for r in rows]})
    assert status == 200, body
    # One form alone, sent as a data: URL, scores as it does among others.
    single = _record(built, rows[4])
    single["image"] = "data:image/png;base64," + single["image"]
    alone = server.call("POST", "/v1/predict", single)[1]["predictions"][0]

    root = copy_of(built, tmp_path)
    subset = built.csv.parent / "subset.csv"  # beside the images its paths name
    _write_manifest(subset, rows)
    use_key(monkeypatch, built.key)
    output = tmp_path / "out.csv"
    assert run_cli(["--quiet", "--config", str(built.config), "--artifacts", str(root),
                    "predict", "--input", str(subset), "--output", str(output),
                    "--plaintext-output"]) == 0
    with output.open(encoding="utf-8", newline="") as handle:
        expected = list(csv.DictReader(handle))
    served = body["predictions"]
    assert len(served) == len(expected) == 10
    assert {c for c in expected[0] if c.startswith("proba_")} == {f"proba_{d}" for d in
                                                                   range(10)}
    for got, want in zip(served, expected, strict=True):
        assert set(got) == set(want)
        for column, value in want.items():
            if column.startswith("proba_"):
                assert got[column] == pytest.approx(float(value), abs=1e-6)
            else:
                assert str(got[column]) == value, column
    assert alone == pytest.approx({**served[4], "row": 0}, abs=1e-6)


def test_a_bad_image_is_422_naming_the_column_and_the_reason(server: Server,
                                                             built: Built) -> None:
    import numpy as np

    good = _record(built, _manifest(built)[0])
    digit = np.frombuffer(base64.b64decode(good["image"]), dtype=np.uint8)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    bad = {
        "not base64 !": "undecodable_image",
        base64.b64encode(b"name,email\nnot an image\n").decode(): "undecodable_image",
        base64.b64encode(digit[: len(digit) // 2].tobytes()).decode(): "truncated_image",
        _png(grey[:27], "L"): "wrong_size",
        _png(rng.integers(0, 256, size=(28, 28, 4), dtype=np.uint8), "RGBA"): "wrong_mode",
        _png(np.full((28, 28), 255, dtype=np.uint8), "L"): "constant_image",
        "": "missing_value",
        _manifest(built)[0]["image"]: "undecodable_image",  # a path is never opened
    }
    for value, reason in bad.items():
        status, body = server.call("POST", "/v1/predict",
                                   {"records": [good, {**good, "image": value}]})
        assert status == 422, (reason, body)
        assert body["problems"] == [{"row": 1, "column": "image", "rule": reason}], reason
        if value:
            assert value[:40] not in json.dumps(body)
    assert server.call("POST", "/v1/predict", {**good, "image": None})[0] == 422
    status, body = server.call("POST", "/v1/predict", {**good, "image": 42})
    assert status == 422 and body["problems"][0]["rule"] == "undecodable_image"


def test_no_image_bytes_file_names_or_names_in_the_log(server: Server, built: Built) -> None:
    rows = _manifest(built)[:4]
    records = [_record(built, r) for r in rows]
    assert server.call("POST", "/v1/predict", {"records": records})[0] == 200
    server.call("POST", "/v1/predict", {"records": [{**records[0], "image": "not base64 !"}]})
    logs = server.logs()
    assert "POST /v1/predict 200" in logs and "rows=4" in logs
    assert "POST /v1/predict 422" in logs
    for row, record in zip(rows, records, strict=True):
        assert record["image"][:40] not in logs and record["image"][-40:] not in logs
        assert row["image"] not in logs and Path(row["image"]).name not in logs
        assert row["name"] not in logs and row["email"].lower() not in logs
    assert "not base64" not in logs
