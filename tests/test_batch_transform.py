"""Batch Transform with the real image under the SageMaker Python SDK's local mode (v2).

What a user runs before paying for a job, with a region and no credentials:
``Model(image_uri=..., model_data="file://.../model.tar.gz")``, ``model.transformer(...)``,
``transform(data="file://...")`` — through :func:`deploy.batch.transform` where it can. Local mode
starts the image with ``serve`` and ``SAGEMAKER_BATCH=True``, reads ``/execution-parameters``,
POSTs each file (SingleRecord) or each mini-batch of whole lines (MultiRecord, SplitType=Line) to
``/invocations``, writes ``<file>.out`` at the input's relative path and stops the container.

The model has random weights and a sharpened head, so that its answers differ from image to
image: each answer is checked against the server's own decoding and network, run here on that
image alone.

Where local mode (sagemaker 2.257.7, ``sagemaker/local/entities.py``, ``_LocalTransformJob``) is
not SageMaker, and what these tests rely on or show:

- it writes whatever ``/invocations`` answers, error responses included, and the job completes
  (``_perform_batch_inference`` never looks at the status code): a refused request shows here as
  its JSON error in the output;
- ``DataProcessing`` (``join_source``, ``input_filter``, ``output_filter``) is accepted and
  ignored: ``LocalSagemakerClient.create_transform_job`` hands it to ``start(**kwargs)``, which
  reads only ``BatchStrategy``, ``MaxPayloadInMB``, ``MaxConcurrentTransforms`` and
  ``Environment`` from them;
- ``AssembleWith=Line`` writes a newline after each response, not after each record; the server's
  JSON Lines answer already ends with one, so each mini-batch's lines are followed by an empty one;
- without a ``BatchStrategy`` it takes the container's ``/execution-parameters`` answer as it is
  and refuses ``MULTI_RECORD``, the spelling SageMaker documents for that answer (it expects the
  API's ``MultiRecord``);
- a ``file://`` folder is read one level deep (``LocalFileDataSource.get_file_list`` in
  ``sagemaker/local/data.py``): files in its subfolders are skipped, where an S3 prefix covers
  every key under it;
- one instance, one request at a time (``MaxConcurrentTransforms`` is forced to 1).
"""

from __future__ import annotations

import base64
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import torch
from PIL import Image
from sagemaker.local.data import LineSplitter, MultiRecordStrategy
from sagemaker.local.local_session import LocalSession
from sagemaker.model import Model

from classifier import artifact
from classifier.artifact import Manifest, Preprocessing
from classifier.models import create_model
from deploy import batch, hosting
from deploy import session as sagemaker_session
from deploy.package import write_tarball
from serve import codec
from serve.predictor import Predictor
from serve.settings import Settings

from containers import docker, image_for
from imagedata import CLASSES, encode, render
from ports import free_port
from sdk_local import REGION, bounded, compose_containers, running

pytestmark = [
    pytest.mark.container,
    # SDK v2 local mode reads docker compose's output through a subprocess pipe it never closes
    # (sagemaker/local/image.py, _stream_output); CPython reports that as a ResourceWarning.
    pytest.mark.filterwarnings("ignore:unclosed file:ResourceWarning"),
]
JOB_TIMEOUT_S = 240  # container start (local mode pings every 5 s, for at most 120 s) and the requests
NOT_AN_IMAGE = b"these bytes are no image"
UNDECODABLE = "the body is not an image this server can decode"


@dataclass(frozen=True)
class Served:
    """The model the jobs serve, and the server's pipeline run here to say what it must answer."""

    tarball: Path
    reference: Predictor

    def answer(self, body: bytes) -> dict[str, Any]:
        """The server's answer for one encoded image: its decoding (at the reduced JPEG scale it
        chooses), preprocessing and network, on this image alone."""
        image = codec.decode_image(body, max_pixels=Settings.max_image_pixels, min_side=self.reference.resize_size)
        [predictions] = self.reference.predict([image], top_k=Settings.top_k)
        return {"predictions": [prediction.to_dict() for prediction in predictions]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    folder = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    network = create_model("resnet18", len(CLASSES))
    with torch.no_grad():
        network.fc.weight.mul_(30)  # random features, sharpened: confident answers that vary per image
    manifest = Manifest(architecture="resnet18", class_names=tuple(CLASSES),
                        preprocessing=Preprocessing(crop_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3))
    model_dir = artifact.save(folder / "model", network, manifest)
    write_tarball(model_dir, folder / "model.tar.gz")
    return Served(folder / "model.tar.gz", Predictor.load(model_dir, allow_default=False, device="cpu"))


@pytest.fixture
def local(no_credentials: None, container_root: Path) -> sagemaker_session.SageMaker:
    return sagemaker_session.local(boto3.Session(region_name=REGION), port=free_port(),
                                   container_root=str(container_root))


@pytest.fixture
def session(local: sagemaker_session.SageMaker) -> LocalSession:
    return local.sdk_session


@pytest.fixture
def image() -> str:
    image = image_for("cpu")
    docker("image", "inspect", image)  # compose would try to pull a missing image from Docker Hub
    return image


@pytest.fixture
def model(session: LocalSession, served: Served, image: str) -> Model:
    """The SDK's own model object, for what only the SDK's transformer can ask of local mode."""
    return Model(image_uri=image, model_data=f"file://{served.tarball}", role=sagemaker_session.LOCAL_ROLE,
                 sagemaker_session=session)


@pytest.fixture
def model_name(local: sagemaker_session.SageMaker, served: Served, image: str) -> str:
    """The model as deploy.batch runs it: created through the API, as the CLI does."""
    return hosting.create_model(local, hosting.ModelSpec(image_uri=image, model_data=f"file://{served.tarball}",
                                                         role=sagemaker_session.LOCAL_ROLE, name="shapes-model"))


def shapes(count: int, *, seed: int) -> list[bytes]:
    """Small JPEGs of the three shapes, in turn."""
    rng = random.Random(seed)
    return [encode(render(name, rng), "JPEG", quality=90) for name, _ in zip(itertools.cycle(CLASSES), range(count))]


def photos(count: int, *, seed: int) -> list[bytes]:
    """640×640 noisy JPEGs of about 220 KB: three to a 1 MB mini-batch, as base64 lines."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    bodies = []
    for name, _ in zip(itertools.cycle(CLASSES), range(count)):
        pixels = np.asarray(render(name, rng).resize((640, 640)), dtype=np.int16)
        pixels = np.clip(pixels + noise.integers(-40, 41, pixels.shape), 0, 255).astype(np.uint8)
        bodies.append(encode(Image.fromarray(pixels), "JPEG", quality=90))
    return bodies


def json_line(body: bytes, **fields: str) -> str:
    return json.dumps({**fields, "b64": base64.b64encode(body).decode()}) + "\n"


def output_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines output, skipping the empty line local mode writes after each
    response (with AssembleWith=Line it adds a newline to an answer that already ends with one)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def assert_answer(got: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """``got`` is ``expected``: the same best label, every probability within 1e-3 (the container
    runs the same network in a batch, with its own build of torch)."""
    assert set(got) == {"predictions"}, f"{where}: {got}"
    assert got["predictions"][0]["label"] == expected["predictions"][0]["label"], f"{where}: {got} != {expected}"
    probabilities = {p["label"]: p["probability"] for p in got["predictions"]}
    assert probabilities == pytest.approx({p["label"]: p["probability"] for p in expected["predictions"]},
                                          abs=1e-3), f"{where}: {got} != {expected}"


def assert_distinct(answers: list[dict[str, Any]]) -> None:
    """No two expected answers could pass for each other, so a swapped or repeated answer fails."""
    vectors = [{p["label"]: p["probability"] for p in answer["predictions"]} for answer in answers]
    for (i, a), (j, b) in itertools.combinations(enumerate(vectors), 2):
        assert max(abs(a[label] - b[label]) for label in a) > 3e-3, f"images {i} and {j} get the same answer"


def expected_lines(answers: list[dict[str, Any]], mini_batches: list[range],
                   refused: dict[int, tuple[str, str]]) -> list[dict[str, Any]]:
    """What a JSON Lines file's output holds: each mini-batch answered line by line, or, where it
    holds a record the server refuses, with that one error instead (the server rejects a bad
    request whole, naming the record by its position in the request)."""
    lines: list[dict[str, Any]] = []
    for records in mini_batches:
        bad = [index for index in records if index in refused]
        if bad:
            code, message = refused[bad[0]]
            lines.append(error(code, message.format(position=records.index(bad[0]))))
        else:
            lines.extend(answers[index] for index in records)
    return lines


def sdk_mini_batches(path: Path, max_payload_mb: int) -> list[range]:
    """The records of each request local mode makes of a JSON Lines file (MultiRecord): as many
    whole lines as fit in ``max_payload_mb``, as its own splitter packs them."""
    batches, start = [], 0
    for payload in MultiRecordStrategy(LineSplitter()).pad(str(path), max_payload_mb):
        count = payload.count("\n")
        batches.append(range(start, start + count))
        start += count
    return batches


def test_a_folder_of_jpegs_is_answered_one_out_file_per_image(local: sagemaker_session.SageMaker, model_name: str,
                                                              served: Served, container_root: Path,
                                                              tmp_path: Path) -> None:
    data, output = tmp_path / "unlabelled", tmp_path / "predictions"
    bodies: dict[str, bytes] = {}
    for index, body in enumerate(shapes(6, seed=21)):
        bodies[f"{index:03d}.jpg"] = body
    bodies["unreadable.jpg"] = NOT_AN_IMAGE
    data.mkdir()
    for name, body in bodies.items():
        (data / name).write_bytes(body)
    answers = {name: served.answer(body) for name, body in bodies.items() if body != NOT_AN_IMAGE}
    assert_distinct(list(answers.values()))

    job = bounded(lambda: batch.transform(local, model_name, data=f"file://{data}", output_path=f"file://{output}",
                                          instance_type="local"),
                  timeout_s=JOB_TIMEOUT_S, root=container_root)

    assert local.sagemaker.describe_transform_job(TransformJobName=job)["TransformJobStatus"] == "Completed"
    written = {path.relative_to(output).as_posix() for path in output.rglob("*") if path.is_file()}
    assert written == {f"{name}.out" for name in bodies}
    for name, expected in answers.items():
        assert_answer(json.loads((output / f"{name}.out").read_text()), expected, name)
    # One request per file: the file that is no image is refused alone. (SageMaker would fail the
    # job for it; local mode writes the server's error instead.)
    assert json.loads((output / "unreadable.jpg.out").read_text()) == error("invalid_image", UNDECODABLE)
    assert running(compose_containers(container_root)) == []


def test_json_lines_are_answered_line_by_line_and_a_bad_record_fails_its_mini_batch_alone(
        local: sagemaker_session.SageMaker, model_name: str, served: Served, container_root: Path,
        tmp_path: Path) -> None:
    data, output = tmp_path / "lines", tmp_path / "predictions"
    data.mkdir()
    # A clean file: one mini-batch, every line answered by its own image's answer, in order.
    small = shapes(6, seed=22)
    (data / "shapes.jsonl").write_text("".join(json_line(body) for body in small))
    # Large photos, three or four lines to a 1 MB mini-batch, with one record in the middle whose
    # base64 is no image.
    large: list[bytes | None] = [*photos(4, seed=23), None, *photos(4, seed=24)]
    (data / "photos.jsonl").write_text("".join(json_line(body or NOT_AN_IMAGE) for body in large))
    # More records in one mini-batch than the server takes in one request (CLASSIFIER_MAX_INSTANCES, 64).
    (data / "thumbnails.jsonl").write_text("".join(json_line(body) for body in shapes(70, seed=25)))

    small_answers = [served.answer(body) for body in small]
    large_answers = [served.answer(body) if body else {} for body in large]
    assert_distinct(small_answers)
    assert_distinct([answer for answer in large_answers if answer])
    bad = large.index(None)
    mini_batches = sdk_mini_batches(data / "photos.jsonl", max_payload_mb=1)
    assert len(mini_batches) >= 3 and bad not in (*mini_batches[0], *mini_batches[-1]), mini_batches

    bounded(lambda: batch.transform(local, model_name, data=f"file://{data}", output_path=f"file://{output}",
                                    instance_type="local", max_payload_mb=1, json_lines=True),
            timeout_s=JOB_TIMEOUT_S, root=container_root)

    assert sorted(path.name for path in output.iterdir()) == ["photos.jsonl.out", "shapes.jsonl.out",
                                                              "thumbnails.jsonl.out"]
    got = output_lines(output / "shapes.jsonl.out")
    assert len(got) == len(small)
    for line, (answer, expected) in enumerate(zip(got, small_answers), start=1):
        assert_answer(answer, expected, f"shapes.jsonl line {line}")

    expected = expected_lines(large_answers, mini_batches,
                              {bad: ("invalid_image", f"instance {{position}}: {UNDECODABLE}")})
    got = output_lines(output / "photos.jsonl.out")
    assert len(got) == len(expected), got
    for line, (answer, wanted) in enumerate(zip(got, expected), start=1):
        if "error" in wanted:
            assert answer == wanted, f"photos.jsonl output line {line}"
        else:
            assert_answer(answer, wanted, f"photos.jsonl output line {line}")

    assert output_lines(output / "thumbnails.jsonl.out") == [
        error("batch_too_large", "the request holds 70 instances; the limit is 64")]

    # The environment SageMaker gives a transform job's container.
    [container] = compose_containers(container_root)
    environment = docker("inspect", "--format", "{{json .Config.Env}}", container).stdout
    for variable in ("SAGEMAKER_BATCH=True", "SAGEMAKER_BATCH_STRATEGY=MULTI_RECORD", "SAGEMAKER_MAX_PAYLOAD_IN_MB=1"):
        assert variable in json.loads(environment)
    assert running([container]) == []


def test_join_source_is_ignored_by_local_mode(model: Model, served: Served, container_root: Path,
                                              tmp_path: Path) -> None:
    """``join_source="Input"`` asks SageMaker to write each input record with its answer (for JSON,
    under ``SageMakerOutput``); local mode drops ``DataProcessing`` and writes the answers alone.
    What it can show is what the join relies on: one answer per input line, in order."""
    data, output = tmp_path / "lines", tmp_path / "joined"
    data.mkdir()
    bodies = shapes(5, seed=26)
    (data / "shapes.jsonl").write_text("".join(json_line(body, id=f"shape-{n}") for n, body in enumerate(bodies)))
    answers = [served.answer(body) for body in bodies]
    assert_distinct(answers)

    transformer = model.transformer(instance_count=1, instance_type="local", strategy="MultiRecord",
                                    assemble_with="Line", accept=batch.JSON_LINES, output_path=f"file://{output}")
    bounded(lambda: transformer.transform(data=f"file://{data}", content_type=batch.JSON_LINES, split_type="Line",
                                          join_source="Input", wait=True, logs=False),
            timeout_s=JOB_TIMEOUT_S, root=container_root)

    got = output_lines(output / "shapes.jsonl.out")
    assert len(got) == len(bodies)
    for line, (answer, expected) in enumerate(zip(got, answers), start=1):
        assert_answer(answer, expected, f"line {line}")  # the answer only: no "id", no "SageMakerOutput"


def test_local_mode_needs_the_batch_strategy_spelled_out(model: Model, container_root: Path,
                                                         tmp_path: Path) -> None:
    """With no strategy, local mode uses the container's ``/execution-parameters`` answer,
    ``"BatchStrategy": "MULTI_RECORD"`` as SageMaker documents it, where its own code expects
    ``MultiRecord`` (``sagemaker/local/data.py``, ``get_batch_strategy_instance``): pass
    ``strategy`` (``deploy.batch.transform`` always does)."""
    data = tmp_path / "lines"
    data.mkdir()
    (data / "shapes.jsonl").write_text(json_line(shapes(1, seed=27)[0]))
    transformer = model.transformer(instance_count=1, instance_type="local", accept=batch.JSON_LINES,
                                    output_path=f"file://{tmp_path / 'out'}")
    with pytest.raises(ValueError, match="Invalid Batch Strategy"):
        bounded(lambda: transformer.transform(data=f"file://{data}", content_type=batch.JSON_LINES,
                                              split_type="Line", wait=True, logs=False),
                timeout_s=JOB_TIMEOUT_S, root=container_root)
    # The failed job leaves its container serving, followed by a thread of the SDK's that would
    # raise if the container were killed: stop it as the job would have.
    assert len(containers := running(compose_containers(container_root))) == 1
    docker("stop", *containers)
    assert docker("inspect", "--format", "{{.State.ExitCode}}", *containers).stdout.strip() == "0"
