"""The image model family "cnn": presets, the image encoder, exact per-example clipping of
convolutions, save and load, and the whole pipeline on a few bundled forms."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from personanet.errors import BadInputError, ConfigError
from personanet.models import family_name_for, get_family, load_model
from personanet.models.cnn import ImageCNN
from personanet.models.image_encoding import ImageEncoder
from personanet.privacy.clipping import BookkeepingClipper
from tests.conftest import ROOT, all_bytes_under

FORMS = ROOT / "data" / "forms"
FORMS_CONFIG = ROOT / "configs" / "forms.toml"


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ presets


def test_seed_preset_is_the_founding_keras_network() -> None:
    model = ImageCNN(preset="seed", shape=[28, 28, 1], n_outputs=10, task="multiclass")
    kinds = [type(m).__name__ for m in [*model.features, *model.head]]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten",
                     "Linear", "ReLU", "Linear"]
    # Keras' model.summary() of the seed: 320 + 18,496 + 204,928 + 1,290
    assert _n_params(model) == 225_034


def test_tanh_preset_is_the_dp_mnist_network() -> None:
    model = ImageCNN(preset="tanh", shape=[28, 28, 1], n_outputs=10, task="multiclass")
    conv1, conv2 = (m for m in model.features if isinstance(m, nn.Conv2d))
    assert (conv1.out_channels, conv1.kernel_size, conv1.stride, conv1.padding) == \
        (16, (8, 8), (2, 2), (3, 3))
    assert (conv2.out_channels, conv2.kernel_size, conv2.stride) == (32, (4, 4), (2, 2))
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 3
    assert _n_params(model) == 26_010
    with_norm = ImageCNN(preset="tanh", shape=[28, 28, 1], n_outputs=10, task="multiclass",
                         norm="groupnorm")
    assert sum(isinstance(m, nn.GroupNorm) for m in with_norm.modules()) == 2


# ------------------------------------------------------------------ clipping


@pytest.mark.parametrize(("preset", "norm"), [("tanh", "none"), ("tanh", "groupnorm"),
                                              ("seed", "none")])
def test_bookkeeping_equals_clipped_opacus_per_sample_gradients(preset: str, norm: str) -> None:
    """Conv2d and GroupNorm (4-D) handlers against Opacus' own per-example gradients."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = ImageCNN(preset=preset, shape=[28, 28, 1], n_outputs=10, task="multiclass",
                     norm=norm)
    reference = ImageCNN(preset=preset, shape=[28, 28, 1], n_outputs=10, task="multiclass",
                         norm=norm)
    reference.load_state_dict(model.state_dict())
    x, y, limit = torch.rand(7, 1, 28, 28), torch.randint(0, 10, (7,)), 0.5
    assert BookkeepingClipper.supports(model)

    sampled = GradSampleModule(reference, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(sampled(x), y, reduction="sum").backward()
    per_sample = {n: p.grad_sample for n, p in reference.named_parameters()}
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_sample.values()))
    coef = (limit / (norms + 1e-6)).clamp(max=1.0)
    assert (coef < 1).any()  # some examples are clipped, so the test sees clipping

    clipper = BookkeepingClipper(model, max_grad_norm=limit)
    found = clipper.backward(nn.functional.cross_entropy(model(x), y, reduction="none"))
    assert torch.allclose(found, norms, rtol=1e-4)
    for name, p in model.named_parameters():
        expected = (per_sample[name] * coef.view(-1, *[1] * (p.dim()))).sum(0)
        assert torch.allclose(p.grad, expected, atol=1e-6, rtol=1e-4), name


def test_grouped_or_same_padded_convolutions_go_to_opacus() -> None:
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 36, 2))
    same = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), nn.Flatten(), nn.Linear(256, 2))
    assert not BookkeepingClipper.supports(grouped)
    assert not BookkeepingClipper.supports(same)


# ------------------------------------------------------------------ encoder


def _encoder() -> ImageEncoder:
    return ImageEncoder(image={"name": "image", "shape": [2, 3, 2]},
                        target={"name": "label", "task": "multiclass",
                                "classes": ["a", "b", "c"]})


def test_encoder_reads_row_major_hwc_bytes_as_nchw_in_unit_range() -> None:
    hwc = np.arange(12, dtype=np.uint8).reshape(2, 3, 2) * 20
    frame = pl.DataFrame({"image": [hwc.tobytes(), bytes(12)], "label": ["b", "zzz"]},
                         schema={"image": pl.Binary, "label": pl.String})
    batch = _encoder().transform(frame)
    assert batch.image.shape == (2, 2, 2, 3)  # (n, C, H, W)
    assert np.allclose(batch.image[0], hwc.transpose(2, 0, 1) / 255.0)
    assert batch.image.max() <= 1.0 and batch.image.dtype == np.float32
    assert batch.target.tolist() == [1, -1]  # outside the categories: unlabelled
    assert batch.labelled.tolist() == [True, False]
    assert set(batch.tensors()) == {"image", "target"}


def test_encoder_refuses_bytes_of_the_wrong_size() -> None:
    frame = pl.DataFrame({"image": [bytes(11)]}, schema={"image": pl.Binary})
    with pytest.raises(BadInputError, match="11 bytes"):
        _encoder().transform(frame)


def test_encoder_round_trips_through_json() -> None:
    encoder = _encoder()
    again = ImageEncoder.from_json(json.loads(json.dumps(encoder.to_json())))
    assert again.shape == (2, 3, 2) and again.target_classes == ["a", "b", "c"]
    with pytest.raises(BadInputError):
        ImageEncoder.from_json({"format": "personanet.encoder/1"})


# ------------------------------------------------------------------ family, config


def test_model_auto_is_cnn_when_a_feature_is_an_image() -> None:
    from personanet.config import load_config

    assert family_name_for(load_config(FORMS_CONFIG)) == "cnn"
    assert family_name_for(load_config(ROOT / "configs" / "persona.toml")) == "tabular"
    with pytest.raises(ConfigError, match="image"):
        load_config(FORMS_CONFIG, ["train.model=tabular"])
    with pytest.raises(ConfigError, match="layernorm"):
        load_config(FORMS_CONFIG, ["train.norm=layernorm"])


def test_save_and_load_without_pickle(tmp_path: Path) -> None:
    from personanet.config import load_config

    config = load_config(FORMS_CONFIG)
    family = get_family("cnn")
    encoder = family.encoder(config)
    spec = family.spec_for(encoder, config.train)
    model = family.build(spec)
    family.save(model, spec, encoder, tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["family"] == "cnn"
    loaded, loaded_encoder = load_model(tmp_path)
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(loaded.predict(image=x), model.predict(image=x))
    assert loaded_encoder.to_json() == encoder.to_json()


# ------------------------------------------------------------------ the pipeline


def _tiny_forms(tmp_path: Path, *, train: int = 56, test: int = 24) -> Path:
    """The first rows of the bundled forms manifest (and their PNGs), and a config."""
    import tomllib

    from tests.conftest import _dump_toml

    data = tmp_path / "forms"
    (data / "images").mkdir(parents=True)
    with (FORMS / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    chosen = [r for r in rows if r["split"] == "train"][:train] + \
        [r for r in rows if r["split"] == "test"][:test]
    with (data / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    for row in chosen:
        shutil.copy(FORMS / row["image"], data / row["image"])
    base = tomllib.loads(FORMS_CONFIG.read_text())
    base["dataset"]["source"] = str(data / "manifest.csv")
    base["predict"]["source"] = str(data / "manifest.csv")
    base["train"].update(epochs=1, batch_size=16, validation_fraction=0.25)
    base["budget"]["epsilon"] = 10.0
    base["evaluate"] = {"bootstrap": 20, "min_group_size": 1}
    path = tmp_path / "forms.toml"
    path.write_text(_dump_toml(base))
    return path


@pytest.mark.slow
def test_forms_pipeline_end_to_end_keeps_images_and_names_encrypted(tmp_path, cli, key_env
                                                                    ) -> None:
    config = _tiny_forms(tmp_path)
    root = tmp_path / "artifacts"
    for stage in ("collect", "clean"):
        assert cli("--config", str(config), "--artifacts", str(root), "--json",
                   stage).code == 0
    trained = cli("--config", str(config), "--artifacts", str(root), "--json", "train")
    assert trained.code == 0, trained.stderr
    figures = trained.json()
    validation = figures["validation"]
    assert validation["rows"] > 0 and figures["train_rows"] + validation["rows"] == 56
    assert [p["epoch"] for p in validation["curve"]] == [1]
    assert 0.0 <= validation["curve"][0]["accuracy"] <= 1.0
    assert "not covered by the model's epsilon" in validation["note"]
    model_dir = Path(trained.json()["path"])
    assert json.loads((model_dir / "model.json").read_text())["family"] == "cnn"
    privacy = json.loads((model_dir / "privacy.json").read_text())
    assert privacy["grad_sample_mode"] == "ghost-bookkeeping"
    assert 0 < privacy["epsilon"] <= 3.0

    evaluated = cli("--config", str(config), "--artifacts", str(root), "--json", "evaluate")
    assert evaluated.code in (0, 69), evaluated.stderr
    metrics = json.loads((Path(evaluated.json()["path"]) / "metrics.json").read_text())
    assert metrics["data"]["n_test"] == 24
    assert metrics["data"]["n_members"] == figures["train_rows"]  # held-out people are not
    assert set(metrics["groups"]) == {"age", "gender"}
    assert metrics["audit"] is not None
    assert len(metrics["per_class"]["per_class"]) == 10
    assert (Path(evaluated.json()["path"]) / "confusion_matrix.png").is_file()
    assert "validation" not in json.dumps(metrics)  # held-out curve stays in train

    predicted = cli("--config", str(config), "--artifacts", str(root), "--json", "predict")
    assert predicted.code == 0, predicted.stderr
    assert predicted.json()["rows_scored"] == 80

    everything = all_bytes_under(root)
    with (tmp_path / "forms" / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows[:5]:
        png = (tmp_path / "forms" / row["image"]).read_bytes()
        assert png[40:80] not in everything  # a slice of the compressed pixels
        assert row["name"].encode() not in everything
        assert row["email"].encode() not in everything


def test_batchnorm_is_refused_under_dp(tmp_path, cli, key_env) -> None:
    config = _tiny_forms(tmp_path, train=20, test=4)
    root = tmp_path / "artifacts"
    for stage in ("collect", "clean"):
        assert cli("--config", str(config), "--artifacts", str(root), stage).code == 0
    refused = cli("--config", str(config), "--artifacts", str(root), "--set",
                  "train.norm=batchnorm", "train")
    assert refused.code == 78
    assert "per-example clipping" in refused.stderr or "clipping no longer" in refused.stderr


def test_validation_people_come_from_the_training_split_by_pseudonym() -> None:
    from personanet.cleaning.values import UNIT
    from personanet.stages.validation import split_validation

    people = [f"{i:016x}" for i in range(0, 2**60, 2**60 // 2000)][:2000]
    frame = pl.DataFrame({UNIT: people + people[:50], "row": range(2050)})
    kept, held = split_validation(frame, seed=42, fraction=0.1)
    assert kept.height + held.height == 2050
    assert set(kept[UNIT]).isdisjoint(held[UNIT])  # a person's rows stay on one side
    assert 150 < held[UNIT].n_unique() < 250
    again, _ = split_validation(frame.reverse(), seed=42, fraction=0.1)
    assert set(again["row"]) == set(kept["row"])  # by person, not by position
    other, _ = split_validation(frame, seed=7, fraction=0.1)
    assert set(other["row"]) != set(kept["row"])
    # the test split uses clean.seed (also 42 by default): the same seed must not pick the
    # same people, or the held-out share of the training people would be empty
    from personanet.stages.clean import hash_split

    test_like = hash_split(pl.Series(people), seed=42, test_fraction=0.2).to_numpy()
    train_people = pl.DataFrame({UNIT: [p for p, t in zip(people, test_like, strict=True)
                                        if not t]})
    assert split_validation(train_people, seed=42, fraction=0.1)[1].height > 100


def test_image_training_keys_are_checked() -> None:
    from personanet.config import load_config

    with pytest.raises(ConfigError, match="augment_multiplicity"):
        load_config(FORMS_CONFIG, ["train.augment_multiplicity=0"])
    with pytest.raises(ConfigError, match="validation_fraction"):
        load_config(FORMS_CONFIG, ["train.validation_fraction=0.9"])
    with pytest.raises(ConfigError, match="max_rows_per_unit"):
        load_config(FORMS_CONFIG, ["train.augment=true", "train.augment_multiplicity=4",
                                   "clean.max_rows_per_unit=3"])
    with pytest.raises(ConfigError, match="cnn model only"):
        load_config(ROOT / "configs" / "persona.toml", ["train.augment=true"])
    config = load_config(FORMS_CONFIG, ["train.augment=true", "train.augment_multiplicity=4"])
    assert config.train.augment_multiplicity == 4


def test_augmentation_multiplicity_trains_on_opacus_hooks(tmp_path, cli, key_env) -> None:
    config = _tiny_forms(tmp_path, train=40, test=4)
    root = tmp_path / "artifacts"
    for stage in ("collect", "clean"):
        assert cli("--config", str(config), "--artifacts", str(root), stage).code == 0
    trained = cli("--config", str(config), "--artifacts", str(root), "--json",
                  "--set", "train.augment=true", "--set", "train.augment_multiplicity=2",
                  "train")
    assert trained.code == 0, trained.stderr
    privacy = json.loads((Path(trained.json()["path"]) / "privacy.json").read_text())
    assert privacy["grad_sample_mode"] == "hooks"  # per-example gradients are averaged
    assert 0 < privacy["epsilon"] <= 3.0


def test_per_class_figures_suppress_small_classes() -> None:
    from personanet.reporting.classes import class_metrics

    y = np.array([0] * 30 + [1] * 25 + [2] * 3)
    proba = np.eye(3)[np.r_[[0] * 27, [1] * 3, [1] * 25, [0] * 3]]
    found = class_metrics(y, proba, ["a", "b", "c"], min_group_size=20)
    assert found["per_class"]["a"] == {"n": 30, "accuracy": 0.9, "precision": 0.9}
    assert found["per_class"]["c"]["accuracy"] is None  # 3 people: not published
    assert found["confusion_matrix"]["labels"] == ["a", "b"]
    assert found["confusion_matrix"]["counts"] == [[27, 3, 0], [0, 25, 0]]
    assert found["confusion_matrix"]["suppressed"] == ["c"]
