"""Image records from collect to clean: a corpus of bad files, each quarantined with its
reason; every row accounted for; the resize policies; an edited PNG makes a new version;
and no image byte or name in plaintext anywhere under the artifact root."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from personanet.cleaning.values import REASONS
from personanet.config import parse_config
from personanet.errors import BadInputError, ConfigError
from personanet.privacy.pseudonym import pseudonym_key
from personanet.sources import open_sources
from personanet.stages.clean import clean_records
from personanet.store import tables
from tests.conftest import ROOT, _dump_toml, all_bytes_under

FORMS = ROOT / "data" / "forms"
HEADER = ["email", "name", "image", "label"]


def digit(seed: int, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    """A random-looking but deterministic 8-bit grey image, never constant."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)


def png(array: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def raw_config(folder: Path, **image: object) -> dict:
    return {
        "dataset": {"name": "forms", "target": "label", "privacy_unit": "email",
                    "source": str(folder / "manifest.csv")},
        "columns": {"email": {"role": "identifier", "case": "lower"},
                    "name": {"role": "identifier"},
                    "image": {"type": "image", "shape": [28, 28, 1], **image},
                    "label": {"role": "target", "categories": ["0", "1"]}},
        "clean": {"test_fraction": 0.5},
    }


def write_manifest(folder: Path, rows: list[tuple[str, str]], header: list[str] = HEADER
                   ) -> Path:
    """One record per (image value, label), each by its own writer."""
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(header)
        for i, (image, label) in enumerate(rows):
            out.writerow([f"writer{i}@example.org", f"Writer Number{i}", image, label])
    return path


def clean_folder(folder: Path, key: object, **image: object):
    config = parse_config(raw_config(folder, **image), path=folder / "c.toml")
    [source] = open_sources(config.dataset.source, config.source, base=folder,
                            columns=config.columns)
    records = source.read()
    return records, clean_records(records, config, pseudonym_key(key))


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[int, str | None]]:
    """A manifest of good and bad images; the expected reason of each row (None: kept)."""
    folder = tmp_path / "forms"
    images = folder / "images"
    images.mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(png(digit(99)))
    good = png(digit(1))
    files = {
        "ok.png": good,
        "ok2.png": png(digit(2)),
        "truncated.png": good[: len(good) // 2],
        "big.png": png(digit(3, (30, 30))),
        "text.png": b"name,email\nAnn,ann@example.org\n",
        "deep.png": png(digit(4).astype(np.uint16) * 257),
        "rgba.png": png(np.dstack([digit(5)] * 4)),
        "empty.png": b"",
        "constant.png": png(np.full((28, 28), 7, np.uint8)),
        "jpeg.jpg": _jpeg(digit(6)),
        "float.npy": _npy(digit(7).astype(np.float32)),
        "objects.npy": _npy(np.array([{"a": 1}], dtype=object)),
        "palette.png": _encoded(Image.fromarray(digit(9)).convert("P"), "PNG"),
        "bomb.png": _encoded(Image.new("1", (9000, 9000)), "PNG"),  # 81 Mpx in a few KB
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    npy = io.BytesIO()
    np.save(npy, digit(8))
    (images / "ok.npy").write_bytes(npy.getvalue())
    os.symlink(tmp_path / "outside.png", images / "link.png")
    os.symlink(images / "ok2.png", images / "link_inside.png")
    rows = [
        ("images/ok.png", None), ("images/ok2.png", None), ("images/jpeg.jpg", None),
        ("images/ok.npy", None), ("images/./../images/ok.png", None),
        ("images/link_inside.png", None),
        ("images/truncated.png", "truncated_image"), ("images/big.png", "wrong_size"),
        ("images/text.png", "undecodable_image"), ("images/deep.png", "not_8bit"),
        ("images/rgba.png", "wrong_mode"), ("images/empty.png", "empty_image"),
        ("images/constant.png", "constant_image"), ("images/float.npy", "not_8bit"),
        ("images/objects.npy", "undecodable_image"), ("images/palette.png", "wrong_mode"),
        ("images/bomb.png", "wrong_size"),
        ("../outside.png", "path_outside_folder"),
        (str(tmp_path / "outside.png"), "path_outside_folder"),
        ("images/link.png", "path_outside_folder"),
        ("images/nowhere.png", "missing_file"), ("images", "missing_file"),
        ("", "missing_value"),
    ]
    write_manifest(folder, [(image, str(i % 2)) for i, (image, _) in enumerate(rows)])
    return folder, {i: reason for i, (_, reason) in enumerate(rows)}


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_every_bad_image_is_quarantined_with_its_reason(corpus, key) -> None:
    folder, expected = corpus
    records, outcome = clean_folder(folder, key)
    assert records["image"].dtype == pl.Binary
    got = {int(r): reason for r, reason in outcome.quarantine.select("row", "reason").iter_rows()}
    assert got == {row: reason for row, reason in expected.items() if reason is not None}
    assert set(outcome.quarantine["column"]) == {"image"}
    assert set(got.values()) <= set(REASONS)
    report = outcome.report
    kept = sum(reason is None for reason in expected.values())
    assert report.rows_train + report.rows_test == kept
    assert report.rows_in == len(expected) == report.rows_accounted


def test_predict_applies_the_same_image_rules(corpus, key) -> None:
    """prepare_rows (what predict runs on each batch) refuses exactly what clean refuses."""
    from personanet.cleaning.rows import prepare_rows

    folder, expected = corpus
    config = parse_config(raw_config(folder), path=folder / "c.toml")
    [source] = open_sources(config.dataset.source, config.source, base=folder,
                            columns=config.columns)
    refused, start = [], 0
    for batch in source.batches(7):
        prepared = prepare_rows(batch.drop("label"), config, pseudonym_key(key),
                                require_target=False)
        refused += [(start + row, reason)
                    for row, reason in prepared.quarantine.select("row", "reason").iter_rows()]
        start += batch.height
    assert refused == [(row, reason) for row, reason in expected.items() if reason is not None]


def test_a_file_over_the_size_limit_is_not_read(tmp_path: Path, key, monkeypatch) -> None:
    from personanet.sources import images

    folder = tmp_path / "f"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(png(digit(1)))
    (folder / "images" / "b.png").write_bytes(png(digit(2)))
    write_manifest(folder, [("images/a.png", "0"), ("images/b.png", "1")])
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", len(png(digit(1))) - 1)
    records, outcome = clean_folder(folder, key)
    assert records["image"].null_count() == 2
    assert outcome.quarantine["reason"].to_list() == ["image_too_large"] * 2


def test_kept_images_are_exactly_height_width_channels_bytes(corpus, key) -> None:
    folder, _ = corpus
    _, outcome = clean_folder(folder, key)
    kept = pl.concat([outcome.train, outcome.test])
    assert kept.schema["image"] == pl.Binary
    assert set(kept["image"].bin.size()) == {28 * 28}
    pixels = {bytes(v) for v in kept["image"]}
    assert digit(1).tobytes() in pixels          # the PNG, decoded row-major
    assert digit(8).tobytes() in pixels          # the NPY
    restored = np.frombuffer(digit(2).tobytes(), np.uint8).reshape(28, 28, 1)
    assert restored[:, :, 0].tolist() == digit(2).tolist()


def test_resize_policies(tmp_path: Path, key) -> None:
    folder = tmp_path / "f"
    (folder / "images").mkdir(parents=True)
    small, big = digit(1, (20, 24)), digit(2, (30, 30))
    (folder / "images" / "small.png").write_bytes(png(small))
    (folder / "images" / "big.png").write_bytes(png(big))
    write_manifest(folder, [("images/small.png", "0"), ("images/big.png", "1")])

    _, refuse = clean_folder(folder, key)
    assert refuse.quarantine["reason"].to_list() == ["wrong_size", "wrong_size"]
    _, fit = clean_folder(folder, key, resize="fit")
    assert fit.report.rows_quarantined == 0
    _, pad = clean_folder(folder, key, resize="pad")
    assert pad.quarantine.select("row", "reason").rows() == [(1, "wrong_size")]
    [padded] = pl.concat([pad.train, pad.test])["image"].to_list()
    canvas = np.frombuffer(padded, np.uint8).reshape(28, 28)
    assert canvas[2:26, 4:24].tolist() == small.tolist()   # centred
    assert canvas[:2].max() == 0 and canvas[:, :4].max() == 0


def test_a_jpeg_is_turned_upright_by_its_exif_orientation(tmp_path: Path, key) -> None:
    folder = tmp_path / "f"
    (folder / "images").mkdir(parents=True)
    tall = np.zeros((28, 20), np.uint8)
    tall[:5] = 255                       # a white band along the top of the stored pixels
    image = Image.fromarray(tall)
    exif = image.getexif()
    exif[0x0112] = 6                     # "turn 90 degrees clockwise to view"
    image.save(folder / "images" / "a.jpg", format="JPEG", exif=exif.tobytes(), quality=100)
    write_manifest(folder, [("images/a.jpg", "0")])
    raw = raw_config(folder)
    raw["columns"]["image"]["shape"] = [20, 28, 1]
    config = parse_config(raw, path=folder / "c.toml")
    [source] = open_sources(config.dataset.source, config.source, base=folder,
                            columns=config.columns)
    outcome = clean_records(source.read(), config, pseudonym_key(key))
    [kept] = pl.concat([outcome.train, outcome.test])["image"].to_list()
    upright = np.frombuffer(kept, np.uint8).reshape(20, 28)
    assert upright[:, -5:].min() > 200 and upright[:, :-6].max() < 50   # the band, now right


def test_rgb_column_takes_rgb_and_refuses_grey(tmp_path: Path, key) -> None:
    folder = tmp_path / "f"
    (folder / "images").mkdir(parents=True)
    rgb = np.dstack([digit(1), digit(2), digit(3)])
    (folder / "images" / "rgb.png").write_bytes(png(rgb))
    (folder / "images" / "grey.png").write_bytes(png(digit(4)))
    write_manifest(folder, [("images/rgb.png", "0"), ("images/grey.png", "1")])
    _, outcome = clean_folder(folder, key, shape=[28, 28, 3])
    assert outcome.quarantine.select("row", "reason").rows() == [(1, "wrong_mode")]
    [kept] = pl.concat([outcome.train, outcome.test])["image"].to_list()
    assert kept == rgb.tobytes()


def test_same_person_same_pixels_is_a_duplicate(tmp_path: Path, key) -> None:
    """Two files (PNG, and the same pixels re-encoded) from one writer count once."""
    folder = tmp_path / "f"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(png(digit(1)))
    (folder / "images" / "a_again.png").write_bytes(png(digit(1), compress_level=1))
    (folder / "images" / "b.png").write_bytes(png(digit(2)))
    with (folder / "manifest.csv").open("w") as handle:
        handle.write("email,name,form,image,label\n"
                     "ann@example.org,Ann,1,images/a.png,0\n"
                     "ann@example.org,Ann,2,images/a_again.png,0\n"
                     "ann@example.org,Ann,3,images/b.png,1\n")
    raw = raw_config(folder)
    raw["columns"]["form"] = {"role": "ignore"}
    raw["clean"] = {"max_rows_per_unit": 3, "dedupe_key": ["email", "form"],
                    "test_fraction": 0.5}
    config = parse_config(raw, path=folder / "c.toml")
    [source] = open_sources(config.dataset.source, config.source, base=folder,
                            columns=config.columns)
    outcome = clean_records(source.read(), config, pseudonym_key(key))
    report = outcome.report
    assert report.duplicates_exact == 1
    assert report.rows_train + report.rows_test == 2
    assert report.rows_accounted == 3


def test_bytes_source_reads_binary_parquet_and_base64(tmp_path: Path, key) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    good, other = png(digit(1)), png(digit(2))
    pl.DataFrame({"email": ["a@x.org", "b@x.org", "c@x.org"], "name": ["A", "B", "C"],
                  "image": [good, other, b"junk"], "label": ["0", "1", "0"]},
                 schema_overrides={"image": pl.Binary}).write_parquet(folder / "m.parquet")
    raw = raw_config(folder, image_source="bytes")
    raw["dataset"]["source"] = str(folder / "m.parquet")
    config = parse_config(raw, path=folder / "c.toml")
    [source] = open_sources(config.dataset.source, config.source, base=folder,
                            columns=config.columns)
    outcome = clean_records(source.read(), config, pseudonym_key(key))
    assert outcome.quarantine.select("row", "reason").rows() == [(2, "undecodable_image")]

    write_manifest(folder, [(base64.b64encode(good).decode(), "0"),
                            ("data:image/png;base64," + base64.b64encode(other).decode(), "1"),
                            ("not base64 at all!", "0")])
    raw["dataset"]["source"] = str(folder / "manifest.csv")
    config = parse_config(raw, path=folder / "c.toml")
    [source] = open_sources(config.dataset.source, config.source, base=folder,
                            columns=config.columns)
    outcome = clean_records(source.read(), config, pseudonym_key(key))
    assert outcome.quarantine.select("row", "reason").rows() == [(2, "undecodable_image")]
    assert outcome.report.rows_train + outcome.report.rows_test == 2


@pytest.mark.parametrize(("image", "message"), [
    ({"type": "image"}, "without shape"),
    ({"type": "image", "shape": [28, 28, 2]}, "1 (grey) or 3 (RGB)"),
    ({"type": "image", "shape": [28, 28]}, "[height, width, channels]"),
    ({"type": "image", "shape": [28, 28, 1], "sensitive": True}, "never a fairness group"),
    ({"type": "image", "shape": [28, 28, 1], "bounds": [0, 255]}, "does not apply"),
    ({"type": "image", "shape": [28, 28, 1], "role": "identifier"}, "role must be"),
    ({"type": "numeric", "bounds": [0, 1], "shape": [28, 28, 1]}, "only applies"),
])
def test_image_keys_are_checked(tmp_path: Path, image: dict, message: str) -> None:
    raw = raw_config(tmp_path)
    raw["columns"]["image"] = image
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        parse_config(raw, path=tmp_path / "c.toml")


def test_image_keys_leave_tabular_hashes_alone() -> None:
    """Configs without images keep the columns hash they had before image keys existed."""
    from personanet.config import load_config

    config = load_config(ROOT / "configs" / "persona.toml")
    assert all(not {"shape", "resize", "image_source"} & set(spec)
               for spec in config.section("columns").values())


def write_toml(folder: Path, raw: dict) -> Path:
    path = folder / "c.toml"
    path.write_text(_dump_toml(raw))
    return path


def test_manifest_without_its_image_column_is_refused_with_65(tmp_path: Path, cli,
                                                               key_env) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    write_manifest(folder, [("x", "0")], header=["email", "name", "picture", "label"])
    result = cli("--config", write_toml(folder, raw_config(folder)),
                 "--artifacts", tmp_path / "a", "collect")
    assert result.code == 65
    assert "image" in result.stderr and result.stderr.strip().count("\n") == 0


def _forms_head(folder: Path, rows: int) -> list[dict[str, str]]:
    """The first `rows` forms of the bundled sample, manifest and PNGs, copied to `folder`."""
    (folder / "images").mkdir(parents=True)
    with (FORMS / "manifest.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        head = [row for _, row in zip(range(rows), reader, strict=False)]
    with (folder / "manifest.csv").open("w", newline="") as handle:
        out = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        out.writeheader()
        out.writerows(head)
    for row in head:
        shutil.copyfile(FORMS / row["image"], folder / row["image"])
    return head


def _forms_config(folder: Path) -> Path:
    import tomllib

    raw = tomllib.loads((ROOT / "configs" / "forms.toml").read_text())
    raw["dataset"]["source"] = str(folder / "manifest.csv")
    raw.pop("predict", None)
    return write_toml(folder, raw)


def test_no_image_bytes_or_names_in_plaintext_under_the_root(tmp_path: Path, cli,
                                                             key_env) -> None:
    folder = tmp_path / "forms"
    head = _forms_head(folder, 50)
    config = _forms_config(folder)
    root = tmp_path / "artifacts"
    assert cli("--config", config, "--artifacts", root, "collect").code == 0
    result = cli("--config", config, "--artifacts", root, "--json", "clean")
    assert result.code == 0, result.stderr
    figures = result.json()
    assert figures["rows_train"] + figures["rows_test"] == 50

    everything = all_bytes_under(root)
    assert len(everything) > 20_000  # the images are in there, encrypted
    for row in head[:3]:
        data = (folder / row["image"]).read_bytes()
        idat = data.index(b"IDAT")
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        for needle in (data[:24], data[idat:idat + 24], data[-40:-12]):
            assert needle not in everything
        pixels = np.asarray(Image.open(folder / row["image"])).tobytes()
        assert pixels[300:332] not in everything       # the decoded pixels either
        for name in (row["name"], row["email"], row["name"].split()[-1]):
            assert name.encode() not in everything
            assert json.dumps(name).encode() not in everything


def test_an_edited_png_makes_a_new_collect_version(tmp_path: Path, cli, key_env) -> None:
    folder = tmp_path / "forms"
    head = _forms_head(folder, 12)
    config = _forms_config(folder)
    root = tmp_path / "artifacts"
    first = cli("--config", config, "--artifacts", root, "--json", "collect").json()
    again = cli("--config", config, "--artifacts", root, "--json", "collect").json()
    assert again["version"] == first["version"] and again["reused"] is True

    target = folder / head[5]["image"]
    edited = np.asarray(Image.open(target)).copy()
    edited[14, 14] ^= 0xFF
    target.write_bytes(png(edited))
    after = cli("--config", config, "--artifacts", root, "--json", "collect").json()
    assert after["reused"] is False and after["version"] != first["version"]


def test_an_image_changed_while_collecting_is_refused(tmp_path: Path, key) -> None:
    folder = tmp_path / "f"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(png(digit(1)))
    write_manifest(folder, [("images/a.png", "0")])
    config = parse_config(raw_config(folder), path=folder / "c.toml")
    [source] = open_sources(config.dataset.source, config.source, base=folder,
                            columns=config.columns)
    source.fingerprint()
    (folder / "images" / "a.png").write_bytes(png(digit(2)))
    with pytest.raises(BadInputError, match="changed while"):
        source.read()


def test_records_hold_file_bytes_inside_the_encrypted_artifact(tmp_path: Path, cli,
                                                               key_env) -> None:
    folder = tmp_path / "forms"
    head = _forms_head(folder, 5)
    config = _forms_config(folder)
    root = tmp_path / "artifacts"
    result = cli("--config", config, "--artifacts", root, "--json", "collect").json()
    [records_file] = Path(result["path"]).glob("records.parquet*")
    records = tables.read_encrypted_parquet(records_file, key_env)
    assert records.schema["image"] == pl.Binary
    assert records["image"].to_list() == [(folder / r["image"]).read_bytes() for r in head]


@pytest.mark.slow
def test_whole_pipeline_on_forms_leaves_no_image_or_name_in_plaintext(tmp_path: Path, cli,
                                                                      key_env) -> None:
    """`run` (collect to predict) on 60 bundled forms, then every byte under the root."""
    import tomllib

    folder = tmp_path / "forms"
    head = _forms_head(folder, 60)
    raw = tomllib.loads((ROOT / "configs" / "forms.toml").read_text())
    raw["dataset"]["source"] = str(folder / "manifest.csv")
    raw["predict"]["source"] = str(ROOT / "data" / "forms_new" / "manifest.csv")
    raw["train"].update({"epochs": 1, "batch_size": 16})
    raw["evaluate"] = {"bootstrap": 10}
    root = tmp_path / "artifacts"
    result = cli("--config", write_toml(folder, raw), "--artifacts", root, "run")
    assert result.code == 0, result.stderr

    everything = all_bytes_under(root)
    new_forms = ROOT / "data" / "forms_new"
    with (new_forms / "manifest.csv").open(newline="") as handle:
        scored = list(csv.DictReader(handle))
    for base, row in [(folder, r) for r in head[:3]] + [(new_forms, r) for r in scored[:3]]:
        data = (base / row["image"]).read_bytes()
        idat = data.index(b"IDAT")
        pixels = np.asarray(Image.open(base / row["image"])).tobytes()
        for needle in (data[:24], data[idat:idat + 24], pixels[300:332],
                       row["name"].encode(), row["email"].encode()):
            assert needle not in everything
