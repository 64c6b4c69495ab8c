"""Behaviour of the public-schema encoder and of PersonaNet (docs/training.md)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from personanet.config import Config, parse_config
from personanet.errors import BadInputError
from personanet.models import load_model, predict_frame
from personanet.models.encoding import Encoder
from personanet.models.tabular import (
    ENCODER_FILE,
    MODEL_FILE,
    SPEC_FILE,
    PersonaLoss,
    PersonaNet,
    save_model,
)


def _config(*, bins: int = 0, target: dict | None = None, **columns: dict) -> Config:
    cols = {
        "id": {"role": "identifier"},
        "age": {"type": "numeric", "bounds": [10, 90]},
        "gain": {"type": "numeric", "bounds": [0, 99999], "scale": "log"},
        "seen": {"type": "datetime", "bounds": ["2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"]},
        "color": {"categories": ["red", "green", "blue"], "missing_indicator": True},
        "y": target or {"role": "target", "categories": ["no", "yes"]},
        **columns,
    }
    raw = {"dataset": {"name": "t", "target": "y", "privacy_unit": "id"}, "columns": cols,
           "train": {"numeric_bins": bins}}
    return parse_config(raw)


def _frame(**overrides: list) -> pl.DataFrame:
    utc = dt.UTC
    data = {
        "id": ["p1", "p2", "p3", "p4"],
        "age": [10.0, 50.0, 200.0, None],
        "gain": [0.0, 99999.0, 1e9, 315.0],
        "seen": [dt.datetime(2023, 1, 1, tzinfo=utc), dt.datetime(2024, 7, 2, tzinfo=utc),
                 dt.datetime(2030, 1, 1, tzinfo=utc), None],
        "color": ["green", "__other__", "__missing__", None],
        "color__missing": [False, False, True, True],
        "y": ["yes", "no", "maybe", None],
    }
    data.update(overrides)
    frame = pl.DataFrame(data)
    return frame.with_columns(pl.col("seen").cast(pl.Datetime("us", "UTC")))


# ----------------------------------------------------------------------- encoder


def test_encoder_comes_from_the_config_alone() -> None:
    encoder = Encoder.from_config(_config())
    assert encoder.cardinalities == [5]  # three colours + other + missing
    assert encoder.numeric_names == ["age", "gain", "seen", "color__missing"]
    # Nothing in it depends on data: two builds are identical, and so is the JSON.
    assert encoder.to_json() == Encoder.from_config(_config()).to_json()
    assert "p1" not in json.dumps(encoder.to_json())


def test_numbers_and_instants_are_clipped_and_scaled_by_their_bounds() -> None:
    batch = Encoder.from_config(_config()).transform(_frame())
    age, gain, seen, indicator = batch.numeric.T
    assert age.tolist() == pytest.approx([0.0, 0.5, 1.0, 0.5])  # null -> midpoint 0.5
    assert gain[0] == 0.0 and gain[1] == pytest.approx(1.0) and gain[2] == pytest.approx(1.0)
    assert gain[3] == pytest.approx(np.log1p(315) / np.log1p(99999), rel=1e-6)
    assert seen[0] == 0.0 and seen[2] == 1.0 and seen[3] == 0.5
    assert seen[1] == pytest.approx(183 / 366, abs=1e-3)
    assert indicator.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert batch.numeric.dtype == np.float32 and batch.categorical.dtype == np.int64
    assert ((batch.numeric >= 0) & (batch.numeric <= 1)).all()


def test_categories_get_indices_with_other_and_missing_slots() -> None:
    frame = _frame(color=["blue", "purple", "__missing__", None])
    batch = Encoder.from_config(_config()).transform(frame.drop("color__missing"))
    assert batch.categorical[:, 0].tolist() == [2, 3, 4, 4]
    # Without clean's indicator column, the indicator is derived from the value.
    assert batch.numeric[:, -1].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_target_classes_and_unlabelled_rows() -> None:
    encoder = Encoder.from_config(_config())
    batch = encoder.transform(_frame())
    assert encoder.target_classes == ["no", "yes"] and encoder.task == "binary"
    assert batch.target.tolist() == [1, 0, -1, -1]
    assert batch.labelled.tolist() == [True, True, False, False]
    assert encoder.transform(_frame().drop("y")).target is None


def test_regression_target_is_scaled_and_unscaled_by_its_bounds() -> None:
    config = _config(target={"role": "target", "type": "numeric", "bounds": [0, 200]})
    encoder = Encoder.from_config(config)
    batch = encoder.transform(_frame(y=[0.0, 50.0, 500.0, None]))
    assert encoder.task == "regression" and encoder.n_outputs == 1
    assert batch.target[:3].tolist() == pytest.approx([0.0, 0.25, 1.0])
    assert np.isnan(batch.target[3])
    assert encoder.unscale_target(np.array([0.25])).tolist() == pytest.approx([50.0])


def test_numeric_bins_are_piecewise_linear_over_the_public_range() -> None:
    encoder = Encoder.from_config(_config(bins=4))
    frame = _frame(age=[10.0, 30.0, 55.0, 90.0])
    batch = encoder.transform(frame)
    names = encoder.numeric_names
    assert len(names) == encoder.n_numeric == 3 + 3 * 4 + 1
    age_bins = batch.numeric[:, [names.index(f"age__bin{j}") for j in range(4)]]
    np.testing.assert_allclose(age_bins, [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0.25, 0],
                                          [1, 1, 1, 1]], atol=1e-6)


def test_json_round_trip_applies_exactly_the_same_transform() -> None:
    encoder = Encoder.from_config(_config(bins=3))
    again = Encoder.from_json(json.loads(json.dumps(encoder.to_json())))
    a, b = encoder.transform(_frame()), again.transform(_frame())
    assert np.array_equal(a.numeric, b.numeric) and np.array_equal(a.categorical,
                                                                   b.categorical)
    with pytest.raises(BadInputError):
        Encoder.from_json({"format": "something else"})


def test_an_empty_frame_encodes_to_empty_arrays() -> None:
    encoder = Encoder.from_config(_config(bins=4))
    batch = encoder.transform(_frame().head(0))
    assert batch.numeric.shape == (0, encoder.n_numeric)
    assert batch.categorical.shape == (0, 1) and len(batch) == 0


def test_a_missing_feature_column_is_a_clear_error() -> None:
    with pytest.raises(BadInputError, match="'age'"):
        Encoder.from_config(_config()).transform(_frame().drop("age"))


# ----------------------------------------------------------------------- network


def _spec(task: str = "binary", **kwargs) -> dict:
    n_outputs = {"binary": 1, "multiclass": 3, "regression": 1}[task]
    spec = {"format": "personanet.model/1", "cardinalities": [5, 4], "n_numeric": 3,
            "n_outputs": n_outputs, "task": task, "hidden_sizes": [16, 8],
            "activation": "tanh", "norm": "none", "dropout": 0.0,
            "categorical_encoding": "onehot", "embedding_dim": 4}
    spec.update(kwargs)
    return spec


def _inputs(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    categorical = torch.stack([torch.randint(0, 5, (n,), generator=g),
                               torch.randint(0, 4, (n,), generator=g)], 1)
    return categorical, torch.rand(n, 3, generator=g)


@pytest.mark.parametrize("task, width", [("binary", 1), ("multiclass", 3), ("regression", 1)])
def test_output_layer_and_loss_follow_the_target(task: str, width: int) -> None:
    net = PersonaNet.from_spec(_spec(task))
    out = net(*_inputs())
    assert out.shape == (10, width)
    target = {"binary": torch.ones(10, dtype=torch.long),
              "multiclass": torch.zeros(10, dtype=torch.long),
              "regression": torch.rand(10)}[task]
    assert PersonaLoss(task, reduction="none")(out, target).shape == (10,)
    predicted = net.predict(*_inputs())
    if task == "regression":
        assert predicted.shape == (10,)
    else:
        assert predicted.shape == (10, max(width, 2))
        assert torch.allclose(predicted.sum(1), torch.ones(10))


@pytest.mark.parametrize("variant", [
    {}, {"norm": "layernorm"}, {"norm": "groupnorm"}, {"activation": "tempered_sigmoid"},
    {"activation": "relu", "dropout": 0.2}, {"categorical_encoding": "embedding"},
])
def test_every_variant_is_dp_compatible_and_has_no_batchnorm(variant: dict) -> None:
    from opacus.validators import ModuleValidator

    net = PersonaNet.from_spec(_spec(**variant))
    assert ModuleValidator.is_valid(net)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not list(net.buffers())
    assert PersonaNet.from_spec(net.spec).spec == net.spec


def test_onehot_first_layer_sees_each_category_once() -> None:
    net = PersonaNet.from_spec(_spec(hidden_sizes=[2]))
    first = net.hidden[0]
    assert first.in_features == 5 + 4 + 3
    seen: list[torch.Tensor] = []
    first.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    net(torch.tensor([[4, 0]]), torch.tensor([[0.1, 0.2, 0.3]]))
    np.testing.assert_allclose(seen[0].numpy(), [[0, 0, 0, 0, 1, 1, 0, 0, 0, 0.1, 0.2, 0.3]],
                               atol=1e-6)


def test_saved_model_reloads_without_pickle_and_predicts_the_same(tmp_path: Path) -> None:
    config = _config()
    encoder = Encoder.from_config(config)
    spec = PersonaNet.spec_for(encoder, dataclasses.replace(config.train, hidden_sizes=[8]))
    torch.manual_seed(0)
    net = PersonaNet.from_spec(spec)
    names = save_model(net, spec, encoder, tmp_path)
    assert sorted(names) == sorted([MODEL_FILE, SPEC_FILE, ENCODER_FILE])
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.iterdir())
    loaded, loaded_encoder = load_model(tmp_path)
    frame = _frame()
    assert np.allclose(predict_frame(net, encoder, frame),
                       predict_frame(loaded, loaded_encoder, frame))
    assert not loaded.training


def test_weights_that_do_not_match_the_spec_are_refused(tmp_path: Path) -> None:
    config = _config()
    encoder = Encoder.from_config(config)
    spec = PersonaNet.spec_for(encoder, config.train)
    save_model(PersonaNet.from_spec(spec), spec, encoder, tmp_path)
    (tmp_path / SPEC_FILE).write_text(json.dumps({**spec, "hidden_sizes": [3]}))
    with pytest.raises(BadInputError, match="does not match"):
        load_model(tmp_path)


# ----------------------------------------------------------------------- model families


def test_a_model_json_that_names_no_family_is_tabular(tmp_path: Path) -> None:
    from personanet.models import family_of, family_of_spec, get_family

    config = _config()
    encoder = Encoder.from_config(config)
    tabular = get_family("tabular")
    spec = tabular.spec_for(encoder, dataclasses.replace(config.train, hidden_sizes=[4]))
    tabular.save(tabular.build(spec), spec, encoder, tmp_path)
    written = json.loads((tmp_path / SPEC_FILE).read_text())
    assert "family" not in written  # model.json keeps the content it always had
    assert family_of_spec(written) is tabular
    loaded, _ = load_model(tmp_path)
    assert isinstance(loaded, PersonaNet) and family_of(loaded) is tabular


def test_an_unknown_family_is_refused(tmp_path: Path) -> None:
    from personanet.models import get_family

    with pytest.raises(BadInputError, match="unknown model family 'image'"):
        get_family("image")
    (tmp_path / SPEC_FILE).write_text(json.dumps({"family": "image"}))
    with pytest.raises(BadInputError, match="unknown model family"):
        load_model(tmp_path)


def test_batches_are_named_tensors_the_family_takes_by_name() -> None:
    from personanet.models import get_family

    config = _config()
    encoder = Encoder.from_config(config)
    batch = encoder.transform(_frame()).tensors()
    assert set(batch) == {"categorical", "numeric", "target"}
    tabular = get_family("tabular")
    net = tabular.build(tabular.spec_for(encoder, config.train))
    assert set(tabular.inputs(batch)) == set(tabular.input_names) == {"categorical", "numeric"}
    assert net(**tabular.inputs(batch)).shape == (len(batch["target"]), 1)

