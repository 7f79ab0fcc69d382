"""Training settings: precedence, string parsing and errors that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.settings import SettingsError, failure_file, parse_value, resolve


def sagemaker_layout(base: Path, hyperparameters: dict | None = None, channels=("training",)) -> Path:
    config = base / "input" / "config"
    config.mkdir(parents=True)
    for channel in channels:
        (base / "input" / "data" / channel / "a").mkdir(parents=True)
    (config / "inputdataconfig.json").write_text(
        json.dumps({c: {"TrainingInputMode": "File"} for c in channels})
    )
    if hyperparameters is not None:
        (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    return base


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("epochs", "64", 64),
        ("epochs", "3.0", 3),
        ("learning_rate", "0.0372", 0.0372),
        ("learning_rate", "1e-3", 0.001),
        ("pretrained", "true", True),
        ("pretrained", "False", False),
        ("pretrained", "0", False),
        ("architecture", "resnet18", "resnet18"),
        ("architecture", '"resnet18"', "resnet18"),  # JSON-encoded by the SageMaker SDK
        ("batch_size", 32, 32),  # SM_HPS carries typed JSON values
    ],
)
def test_string_values_become_typed(name: str, raw: object, expected: object) -> None:
    assert parse_value(name, raw, "test") == expected


@pytest.mark.parametrize(
    ("name", "raw"),
    [("epochs", "ten"), ("epochs", "2.5"), ("pretrained", "maybe"), ("learning_rate", "fast")],
)
def test_bad_values_name_the_key_and_value(name: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=rf"{name}='{raw}'"):
        parse_value(name, raw, "hyperparameters.json")


def test_defaults_on_an_empty_sagemaker_layout(tmp_path: Path) -> None:
    settings = resolve([], {"SAGEMAKER_BASE_DIR": str(sagemaker_layout(tmp_path))})
    assert settings.hyperparameters.epochs == 10
    assert settings.hyperparameters.architecture == "efficientnet_lite0"
    assert settings.paths.model_dir == tmp_path / "model"
    assert settings.paths.train_dir == tmp_path / "input" / "data" / "training"
    assert settings.paths.output_data_dir == tmp_path / "output" / "data"
    assert settings.paths.failure_file == tmp_path / "output" / "failure"
    assert settings.paths.validation_dir is None


# Each row: which sources set `epochs`, and which value must win.
PRECEDENCE = [
    ({}, 10),
    ({"env": "4"}, 4),
    ({"env": "4", "file": "3"}, 3),
    ({"env": "4", "file": "3", "cli": "2"}, 2),
    ({"cli": "2"}, 2),
    ({"file": "3"}, 3),
    ({"env": "4", "cli": "2"}, 2),
]


@pytest.mark.parametrize(("sources", "expected"), PRECEDENCE)
def test_precedence_cli_then_file_then_env_then_default(tmp_path: Path, sources: dict, expected: int) -> None:
    hyperparameters = {"epochs": sources["file"]} if "file" in sources else {}
    base = sagemaker_layout(tmp_path, hyperparameters)
    environ = {"SAGEMAKER_BASE_DIR": str(base)}
    if "env" in sources:
        environ["SM_HP_EPOCHS"] = sources["env"]
    argv = ["--epochs", sources["cli"]] if "cli" in sources else []
    assert resolve(argv, environ).hyperparameters.epochs == expected


def test_sm_hps_json_is_read_and_sm_hp_overrides_it(tmp_path: Path) -> None:
    environ = {
        "SAGEMAKER_BASE_DIR": str(sagemaker_layout(tmp_path)),
        "SM_HPS": json.dumps({"batch_size": 16, "epochs": 7}),
        "SM_HP_EPOCHS": "5",
    }
    hp = resolve([], environ).hyperparameters
    assert (hp.batch_size, hp.epochs) == (16, 5)


def test_paths_cli_then_sm_env_then_base_dir(tmp_path: Path) -> None:
    base = sagemaker_layout(tmp_path)
    environ = {"SAGEMAKER_BASE_DIR": str(base), "SM_MODEL_DIR": str(tmp_path / "env-model")}
    assert resolve([], environ).paths.model_dir == tmp_path / "env-model"
    argv = ["--model-dir", str(tmp_path / "cli-model")]
    assert resolve(argv, environ).paths.model_dir == tmp_path / "cli-model"


def test_sm_channel_env_without_any_sagemaker_files(tmp_path: Path) -> None:
    (tmp_path / "data" / "a").mkdir(parents=True)
    environ = {"SAGEMAKER_BASE_DIR": str(tmp_path / "ml"), "SM_CHANNEL_TRAINING": str(tmp_path / "data")}
    assert resolve([], environ).paths.train_dir == tmp_path / "data"


def test_hyphenated_underscored_and_aliased_keys(tmp_path: Path) -> None:
    base = sagemaker_layout(tmp_path, {"batch-size": "8", "lr": "0.5", "sagemaker_program": "x"})
    hp = resolve(["--learning_rate", "0.25"], {"SAGEMAKER_BASE_DIR": str(base)}).hyperparameters
    assert hp.batch_size == 8
    assert hp.learning_rate == 0.25


def test_unknown_hyperparameter_lists_the_known_ones(tmp_path: Path) -> None:
    base = sagemaker_layout(tmp_path, {"epoch": "3"})
    with pytest.raises(SettingsError) as error:
        resolve([], {"SAGEMAKER_BASE_DIR": str(base)})
    message = str(error.value)
    assert "unknown hyperparameter 'epoch'" in message
    assert "did you mean 'epochs'" in message
    assert "learning_rate" in message


def test_unknown_cli_flag_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="--epoch"):
        resolve(["--epoch", "3"], {"SAGEMAKER_BASE_DIR": str(sagemaker_layout(tmp_path))})


def test_out_of_range_and_unknown_architecture(tmp_path: Path) -> None:
    environ = {"SAGEMAKER_BASE_DIR": str(sagemaker_layout(tmp_path))}
    with pytest.raises(SettingsError, match="epochs=0 must be at least 1"):
        resolve(["--epochs", "0"], environ)
    with pytest.raises(SettingsError, match="did you mean resnet18"):
        resolve(["--architecture", "resnet-18"], environ)


def test_missing_training_channel_names_what_was_found(tmp_path: Path) -> None:
    base = sagemaker_layout(tmp_path, channels=("validation",))
    with pytest.raises(SettingsError, match=r"no training data.*\['validation'\]"):
        resolve([], {"SAGEMAKER_BASE_DIR": str(base)})


def test_pipe_mode_is_refused(tmp_path: Path) -> None:
    base = sagemaker_layout(tmp_path)
    (base / "input" / "config" / "inputdataconfig.json").write_text(
        json.dumps({"training": {"TrainingInputMode": "Pipe"}})
    )
    with pytest.raises(SettingsError, match="Pipe input mode"):
        resolve([], {"SAGEMAKER_BASE_DIR": str(base)})


def test_single_channel_with_train_valid_test_subfolders(tmp_path: Path) -> None:
    for split in ("train", "valid", "test"):
        (tmp_path / "dogs" / split / "a").mkdir(parents=True)
    paths = resolve(["--train", str(tmp_path / "dogs"), "--base-dir", str(tmp_path / "ml")], {}).paths
    assert paths.train_dir == tmp_path / "dogs" / "train"
    assert paths.validation_dir == tmp_path / "dogs" / "valid"
    assert paths.test_dir == tmp_path / "dogs" / "test"


def test_failure_file_follows_base_dir_even_when_settings_fail(tmp_path: Path) -> None:
    assert failure_file(["--base-dir", str(tmp_path)], {}) == tmp_path / "output" / "failure"
    assert failure_file([], {"SAGEMAKER_BASE_DIR": str(tmp_path)}) == tmp_path / "output" / "failure"
    assert failure_file([], {}) == Path("/opt/ml/output/failure")
