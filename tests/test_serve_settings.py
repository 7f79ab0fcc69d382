"""The server's settings from an environment mapping: SageMaker's variables and CLASSIFIER_*."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve.settings import BATCH_TIMEOUT_S, MEGABYTE, REALTIME_TIMEOUT_S, ConfigError, Settings


def test_defaults_follow_the_sagemaker_layout() -> None:
    settings = Settings.from_env({})
    assert settings.port == 8080 and settings.workers == 1
    assert settings.model_dir == Path("/opt/ml/model")
    assert settings.max_body_bytes == 6 * MEGABYTE
    assert settings.request_timeout_s == REALTIME_TIMEOUT_S
    assert settings.threads_per_worker == (os.cpu_count() or 1)
    assert not settings.multi_model and settings.model_memory_budget_bytes is None and settings.evict_models


def test_sagemaker_variables_are_honoured() -> None:
    settings = Settings.from_env({
        "SAGEMAKER_BIND_TO_PORT": "9090", "SAGEMAKER_MODEL_SERVER_WORKERS": "2", "SAGEMAKER_BATCH": "true",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20", "SAGEMAKER_BATCH_STRATEGY": "single_record", "SM_MODEL_DIR": "/models/a",
    })
    assert (settings.port, settings.workers, settings.batch_transform) == (9090, 2, True)
    assert settings.max_body_bytes == 20 * MEGABYTE and settings.batch_strategy == "SINGLE_RECORD"
    assert settings.request_timeout_s == BATCH_TIMEOUT_S and settings.model_dir == Path("/models/a")
    assert settings.threads_per_worker == max(1, (os.cpu_count() or 1) // 2)
    assert settings.max_concurrent_transforms == 2


def test_each_worker_may_run_a_pass_on_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker may hold every connection while another idles, so its passes are not limited to
    its share of the cores; a lone pass's threads are."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    settings = Settings.from_env({"SAGEMAKER_MODEL_SERVER_WORKERS": "2"})
    assert (settings.threads_per_worker, settings.inference_threads) == (4, 8)
    assert Settings.from_env({}).inference_threads == 8


def test_behind_an_asynchronous_endpoint_requests_may_be_larger_and_slower(tmp_path: Path) -> None:
    settings = Settings.from_env({"CLASSIFIER_ASYNC": "true"})
    assert settings.asynchronous and settings.max_body_bytes == 1024 * MEGABYTE
    assert settings.request_timeout_s == 3600 and settings.body_timeout_s == 300
    assert settings.max_memory_body_bytes == 8 * MEGABYTE  # only an image may be larger (on disk)
    chosen = Settings.from_env({"CLASSIFIER_ASYNC": "1", "SAGEMAKER_MODEL_SERVER_TIMEOUT": "900",
                                "CLASSIFIER_MAX_BODY_MB": "100", "CLASSIFIER_SPOOL_DIR": str(tmp_path),
                                "CLASSIFIER_MAX_MEMORY_BODY_MB": "50"})
    assert chosen.request_timeout_s == 900 and chosen.max_body_bytes == 100 * MEGABYTE
    assert chosen.spool_dir == tmp_path and chosen.max_memory_body_bytes == 50 * MEGABYTE
    # Elsewhere every body may be as large as the body limit (Batch Transform's MaxPayloadInMB).
    batch = Settings.from_env({"SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20"})
    assert batch.max_body_bytes == 20 * MEGABYTE and batch.max_memory_body_bytes is None
    with pytest.raises(ConfigError, match="CLASSIFIER_SPOOL_DIR='/no/such/folder' is not a folder"):
        Settings.from_env({"CLASSIFIER_SPOOL_DIR": "/no/such/folder"})


@pytest.mark.parametrize("key", ["SAGEMAKER_MULTI_MODEL", "CLASSIFIER_MULTI_MODEL"])
def test_multi_model_mode_runs_one_process_with_its_memory_policy(key: str) -> None:
    settings = Settings.from_env({key: "true", "SAGEMAKER_MODEL_SERVER_WORKERS": "4",
                                  "CLASSIFIER_MODEL_MEMORY_MB": "1024", "CLASSIFIER_MEMORY_RESERVE_MB": "0",
                                  "CLASSIFIER_EVICT_MODELS": "false"})
    assert settings.multi_model and settings.workers == 1
    assert settings.model_memory_budget_bytes == 1024 * MEGABYTE and settings.memory_reserve_bytes == 0
    assert not settings.evict_models


@pytest.mark.parametrize(("key", "value"), [
    ("SAGEMAKER_MODEL_SERVER_WORKERS", "0"), ("SAGEMAKER_BATCH_STRATEGY", "ALL"), ("CLASSIFIER_MAX_BATCH_SIZE", "x"),
    ("CLASSIFIER_MODEL_MEMORY_MB", "-5"), ("CLASSIFIER_MULTI_MODEL", "maybe"), ("CLASSIFIER_ACCESS_LOG", "loud"),
    ("CLASSIFIER_JIT", "sometimes"),
])
def test_bad_values_name_the_variable(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Settings.from_env({key: value})


@pytest.mark.parametrize(("value", "jit"), [(None, None), ("auto", None), ("false", False), ("true", True)])
def test_torchscript_is_left_to_the_device_unless_chosen(value: str | None, jit: bool | None) -> None:
    assert Settings.from_env({} if value is None else {"CLASSIFIER_JIT": value}).jit is jit


def test_eviction_is_left_to_sagemaker_on_its_multi_model_endpoints() -> None:
    assert not Settings.from_env({"SAGEMAKER_MULTI_MODEL": "true"}).evict_models
    assert Settings.from_env({"CLASSIFIER_MULTI_MODEL": "true"}).evict_models
    assert Settings.from_env({"SAGEMAKER_MULTI_MODEL": "true", "CLASSIFIER_EVICT_MODELS": "true"}).evict_models
