"""The user's own code in the real image, through the SageMaker Python SDK's local mode.

What a SageMaker PyTorch user already has, unchanged (``tests/user_code/shapes``): a training
script (argparse, ``SM_*`` defaults, ``torch.save(model.state_dict(), .../model.pth)``, an import
from its ``requirements.txt``) and an ``inference.py`` with ``model_fn`` / ``input_fn`` /
``predict_fn`` and no ``output_fn``. Only ``image_uri`` says which container runs them:

    PyTorch(entry_point="train.py", source_dir=..., image_uri=IMAGE, ...).fit(...)
    PyTorchModel(model_data, entry_point="inference.py", source_dir=..., image_uri=IMAGE, ...).deploy(...)
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest
import torch
from PIL import Image
from sagemaker.deserializers import JSONDeserializer
from sagemaker.predictor import Predictor as EndpointPredictor
from sagemaker.pytorch import PyTorch, PyTorchModel
from sagemaker.serializers import IdentitySerializer

from classifier.models import create_model
from deploy import session as sagemaker_session
from deploy.cli import main as deploy_main
from serve.predictor import Predictor

from artifacts import constant_artifact
from containers import classify, docker, image_for, serving, write_training_config
from imagedata import CLASSES, encode, write_image_folder
from ports import free_port
from sdk_local import REGION, compose_containers, running

pytestmark = [
    pytest.mark.container,
    pytest.mark.filterwarnings("ignore:unclosed file:ResourceWarning"),
]
USER_CODE = Path(__file__).parent / "user_code" / "shapes"


@pytest.fixture
def session(no_credentials: None, container_root: Path):
    port = free_port()
    return sagemaker_session.local(boto3.Session(region_name=REGION), port=port,
                                   container_root=str(container_root)).sdk_session


def estimator(session, output: Path, instance_count: int = 1, **options) -> PyTorch:
    return PyTorch(entry_point="train.py", source_dir=str(USER_CODE), image_uri=image_for("cpu"),
                   role=sagemaker_session.LOCAL_ROLE, instance_type="local", instance_count=instance_count,
                   output_path=f"file://{output}", sagemaker_session=session, **options)


def model_files(output: Path) -> set[str]:
    with tarfile.open(output / "model.tar.gz") as archive:
        return {name.removeprefix("./") for name in archive.getnames()} - {"", "."}


def test_a_users_script_trains_and_its_inference_py_serves_the_result(session, tmp_path: Path,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "train", 30, seed=1)
    held_out = write_image_folder(tmp_path / "held-out", 6, seed=3)
    output = tmp_path / "output"

    job = estimator(session, output, hyperparameters={"epochs": 8, "batch-size": 16, "lr": 0.01})
    job.fit({"training": f"file://{data}"})
    log = capfd.readouterr().out
    assert "rank 0 of 1" in log, log[-4000:]
    assert {"model.pth", "classes.json"} <= model_files(output)
    with tarfile.open(output / "output.tar.gz") as archive:
        summary = archive.extractfile("data/summary.txt")
        assert summary is not None and summary.read().decode() == "trained on 720 images\n"

    # code_location: with no AWS credentials, SDK v2 cannot look up a default bucket (local mode uploads nothing).
    model = PyTorchModel(model_data=job.model_data, entry_point="inference.py", source_dir=str(USER_CODE),
                         image_uri=image_for("cpu"), role=sagemaker_session.LOCAL_ROLE, sagemaker_session=session,
                         code_location="s3://unused-in-local-mode/code")
    model.deploy(initial_instance_count=1, instance_type="local", endpoint_name="shapes-byo")
    predictor = EndpointPredictor("shapes-byo", sagemaker_session=session, serializer=IdentitySerializer("image/jpeg"),
                          deserializer=JSONDeserializer())
    try:
        answers = {path: predictor.predict(encode(Image.open(path).convert("RGB"), "JPEG"))
                   for path in sorted(held_out.rglob("*.png"))}
    finally:
        predictor.delete_endpoint()
    assert all(set(answer) == {"label", "probability"} for answer in answers.values()), answers
    correct = sum(answer["label"] == path.parent.name for path, answer in answers.items())
    assert correct >= 0.8 * len(answers), answers  # chance is 1/3
    assert running(compose_containers(Path(session.config["local"]["container_root"]))) == []


def test_a_users_script_trains_on_two_instances_with_torch_distributed(session, tmp_path: Path,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "train", 12, seed=5)
    output = tmp_path / "output"
    job = estimator(session, output, instance_count=2, hyperparameters={"epochs": 2, "batch-size": 8},
                    distribution={"torch_distributed": {"enabled": True}})
    job.fit({"training": f"file://{data}"})
    log = capfd.readouterr().out
    hosts = set(re.findall(r"rank [01] of 2 on (algo-\d-[a-z0-9]{5})", log))
    assert len(hosts) == 2, log[-6000:]
    assert {"model.pth", "classes.json"} <= model_files(output)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("shapes") / "training", 4, seed=9)


def script_job(base: Path, data: Path, hyperparameters: dict[str, str]) -> Path:
    """/opt/ml as SageMaker lays it out for a script-mode job, the source already in /opt/ml/code."""
    write_training_config(base, {**hyperparameters, "sagemaker_program": '"train.py"',
                                 "sagemaker_submit_directory": '"/opt/ml/code"'}, ["training"])
    shutil.copytree(data, base / "input" / "data" / "training")
    shutil.copytree(USER_CODE, base / "code")
    return base


@pytest.mark.parametrize(("hyperparameters", "exit_code", "reason"), [
    ({"epochs": "1", "exit-code": "3"}, 3, "ExitCode 3"),
    ({"epochz": "1"}, 2, "unrecognized arguments: --epochz 1"),
])
def test_a_failing_script_fails_the_job_with_its_reason(shapes: Path, tmp_path: Path, hyperparameters: dict[str, str],
                                                       exit_code: int, reason: str) -> None:
    base = script_job(tmp_path / "ml", shapes, hyperparameters)
    run = docker("run", "--rm", "-v", f"{base}:/opt/ml", image_for("cpu"), "train", check=False, timeout=300)
    assert run.returncode == exit_code, run.stderr[-3000:]
    failure = (base / "output" / "failure").read_text()
    assert failure.startswith("ExecuteUserScriptError:") and reason in failure, failure
    assert json.loads((base / "input" / "config" / "hyperparameters.json").read_text())["sagemaker_program"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["state_dict", "torchscript", "onnx"])
def test_a_packaged_model_is_served_by_the_container(kind: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", len(CLASSES)).eval()
    if kind == "state_dict":
        torch.save(model.state_dict(), tmp_path / "weights.pth")
        source = ["--architecture", "resnet18", "--weights", str(tmp_path / "weights.pth")]
    elif kind == "torchscript":
        torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
        source = ["--torchscript", str(tmp_path / "scripted.pt")]
    else:
        torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), str(tmp_path / "exported.onnx"), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
        source = ["--onnx", str(tmp_path / "exported.onnx")]
    assert deploy_main(["package", *source, "--classes", ",".join(CLASSES), "--image-size", "64",
                        "--output", str(tmp_path / "model")], environ={}) == 0, capsys.readouterr().err
    photo = encode(Image.new("RGB", (80, 60), (200, 40, 40)), "PNG")
    expected = Predictor.load(tmp_path / "model", allow_default=False, device="cpu").predict(
        [Image.open(io.BytesIO(photo)).convert("RGB")], top_k=3)[0]
    with serving(image_for("cpu"), "-v", f"{tmp_path / 'model'}:/opt/ml/model:ro") as served:
        answer = classify(served.url, photo)
    assert [p["label"] for p in answer[:3]] == [p.label for p in expected]
    assert answer[0]["probability"] == pytest.approx(expected[0].probability, abs=1e-3)


# Batch-safe handlers with a helper module of their own: y = factor × (sum of each row).
BATCHED_INFERENCE_PY = '''
import json

import torch
from helper import FACTOR


def model_fn(model_dir):
    return FACTOR


def input_fn(body, content_type):
    if content_type != "application/json":
        raise ValueError(f"send application/json, not {content_type}")
    return torch.tensor(json.loads(body), dtype=torch.float32)


def predict_fn(rows, factor):
    return rows.sum(dim=1) * factor
'''


def test_a_multi_model_endpoint_serves_handler_models_batched_beside_an_artifact(tmp_path: Path) -> None:
    """The real image in multi-model mode with CLASSIFIER_HANDLER_BATCHING: two models whose code
    imports a helper of the same name, each answered with its own, and an artifact beside them."""
    models = tmp_path / "models"
    for name, factor in (("double", 2), ("triple", 3)):
        code = models / name / "model" / "code"
        code.mkdir(parents=True)
        (code / "inference.py").write_text(BATCHED_INFERENCE_PY)
        (code / "helper.py").write_text(f"FACTOR = {factor}\n")
    constant_artifact(models / "pets" / "model", ("cat", "dog"), "dog")
    with serving(image_for("cpu"), "-e", "SAGEMAKER_MULTI_MODEL=true", "-e", "CLASSIFIER_HANDLER_BATCHING=true",
                 "-v", f"{models}:/opt/ml/models:ro") as served:
        for name in ("double", "triple", "pets"):
            load = httpx.post(f"{served.url}/models", json={"model_name": name, "url": f"/opt/ml/models/{name}/model"},
                              timeout=120)
            assert load.status_code == 200, load.text
        assert httpx.get(f"{served.url}/models/double", timeout=10).json()["batched"] is True

        def invoke(job: tuple[str, int]) -> httpx.Response:
            name, value = job
            return httpx.post(f"{served.url}/models/{name}/invoke", content=json.dumps([[value, 1.0]]),
                              headers={"Content-Type": "application/json"}, timeout=60)

        jobs = [(name, value) for value in range(8) for name in ("double", "triple")]
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(invoke, jobs))
        for (name, value), answer in zip(jobs, answers, strict=True):
            assert answer.status_code == 200, answer.text
            assert answer.json() == [(value + 1) * {"double": 2, "triple": 3}[name]]
            assert "batch of" in answer.headers["server-timing"]
        refused = httpx.post(f"{served.url}/models/double/invoke", content=b"1,2", headers={"Content-Type": "text/csv"},
                             timeout=60)
        assert refused.status_code == 400 and "send application/json" in refused.json()["error"]["message"]
        pets = httpx.post(f"{served.url}/models/pets/invoke", content=encode(Image.new("RGB", (40, 40), "red"), "PNG"),
                          headers={"Content-Type": "image/png"}, timeout=60)
        assert pets.json()["predictions"][0]["label"] == "dog"
