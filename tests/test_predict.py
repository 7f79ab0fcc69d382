"""``classifier-predict`` against the real server process and a stubbed ``sagemaker-runtime`` client.

The server tests start ``python -m serve`` once for the module with a tiny model in the real
artifact format and drive ``deploy.predict.main`` as a user would type it. The endpoint tests use
botocore's Stubber on a real ``sagemaker-runtime`` client, so every request is checked against the
API model; the missing-credentials case uses a real client with no credentials at all.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from classifier import artifact
from classifier.artifact import Manifest, Preprocessing
from classifier.models import create_model
from deploy.predict import main

from artifacts import constant_artifact
from imagedata import CLASSES, render
from ports import free_port
from server_process import ROOT, server

LABELS = sorted(CLASSES)  # the model's class order: index i is LABELS[i]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module: a randomly initialised resnet18 (its labels are arbitrary, not wrong)."""
    manifest = Manifest(architecture="resnet18", class_names=tuple(LABELS),
                        preprocessing=Preprocessing(crop_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3))
    model_dir = artifact.save(tmp_path_factory.mktemp("predict") / "model", create_model("resnet18", 3), manifest)
    with server(model_dir) as (address, _):
        yield address


def write_images(root: Path, *names: str, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for index, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        render(LABELS[index % 3], rng).save(path)
        paths.append(path)
    return paths


def top_label(url: str, path: Path) -> str:
    """What the server itself answers for the file, asked directly."""
    kind = "image/jpeg" if path.suffix == ".jpg" else "image/png"
    response = httpx.post(f"{url}/invocations", content=path.read_bytes(), headers={"Content-Type": kind}, timeout=30)
    return response.json()["predictions"][0]["label"]


def run(*argv: str | Path, environ: dict[str, str] | None = None, **kwargs) -> int:
    return main([str(arg) for arg in argv], environ=environ or {}, **kwargs)


def table_rows(out: str) -> dict[str, list[str]]:
    """file -> the rest of its row, from the table's data lines (after the header rule)."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    return {line.split()[0]: line.split()[1:] for line in lines[rule + 1:] if line.strip()}


# --- against the real server -------------------------------------------------------------------


def test_a_file_a_folder_and_a_glob_give_one_table_row_each(url: str, tmp_path: Path, capsys,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    single, *_ = write_images(tmp_path, "single.png")
    folder = write_images(tmp_path, "photos/a.png", "photos/deeper/b.jpg", "photos/c.PNG", seed=1)
    (tmp_path / "photos" / "notes.txt").write_text("not an image, not sent")
    (tmp_path / "photos" / "._a.png").write_bytes(b"macOS metadata, hidden, not sent")
    globbed = write_images(tmp_path, "shots/x.png", "shots/y[bold].png", seed=2)  # not rich markup

    assert run("--url", url, "--top-k", "3", "--no-progress", "single.png", "photos", "shots/*.png") == 0
    out, err = capsys.readouterr()
    assert err == ""
    rows = table_rows(out)
    expected = [single, *sorted(folder), *globbed]
    assert list(rows) == [path.relative_to(tmp_path).as_posix() for path in expected]  # input order
    for path in expected:
        label, probability, *others = rows[path.relative_to(tmp_path).as_posix()]
        assert label == top_label(url, path)
        assert 0 < float(probability) <= 1
        # the two runners-up as "label (p)," — together with the top label, every class once
        assert {label, others[0], others[2]} == set(LABELS), others
        assert others[1].startswith("(") and others[3].endswith(")")


def test_csv_has_one_row_per_prediction_and_json_one_record_per_file(url: str, tmp_path: Path, capsys) -> None:
    paths = write_images(tmp_path, "a.png", "b.png", "c.jpg")
    assert run("--url", url, "--top-k", "2", "--format", "csv", "--concurrency", "2", tmp_path) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(row["file"], row["rank"]) for row in rows] == [(str(p), rank) for p in paths for rank in ("1", "2")]
    for first, second in zip(rows[::2], rows[1::2]):
        assert float(first["probability"]) >= float(second["probability"])
    assert all(LABELS[int(row["index"])] == row["label"] for row in rows)
    assert [row["label"] for row in rows[::2]] == [top_label(url, p) for p in paths]

    assert run("--url", url, "--top-k", "2", "--format", "json", tmp_path) == 0
    records = json.loads(capsys.readouterr().out)
    assert [record["file"] for record in records] == [str(p) for p in paths]
    for record, row in zip(records, rows[::2]):
        assert len(record["predictions"]) == 2
        assert record["predictions"][0] == {"label": row["label"], "index": int(row["index"]),
                                            "probability": float(row["probability"])}


def test_output_writes_the_file_in_the_format_its_name_says(url: str, tmp_path: Path, capsys) -> None:
    write_images(tmp_path / "photos", "a.png", "b.png")
    for name in ("out.csv", "out.json"):
        assert run("--url", url, "--output", tmp_path / name, tmp_path / "photos") == 0
        out, err = capsys.readouterr()
        assert out == "" and f"wrote {tmp_path / name}" in err
    assert (tmp_path / "out.csv").read_text().startswith("file,rank,label,index,probability\n")
    assert len(json.loads((tmp_path / "out.json").read_text())) == 2
    with pytest.raises(SystemExit) as exit_info:  # a table is for the terminal
        run("--url", url, "--output", tmp_path / "out.txt", tmp_path / "photos")
    assert exit_info.value.code == 2


def test_unreadable_and_refused_files_are_skipped_and_listed(url: str, tmp_path: Path, capsys) -> None:
    good = write_images(tmp_path, "photos/good.png", "photos/also-good.jpg")
    (tmp_path / "photos" / "garbage.png").write_bytes(b"these bytes are no image")
    (tmp_path / "photos" / "gone.png").symlink_to(tmp_path / "deleted.png")  # found, but cannot be read
    (tmp_path / "empty-folder.png").mkdir()  # a folder with an image's name holds no image

    code = run("--url", url, "--format", "json", tmp_path / "photos", tmp_path / "empty-folder.png",
               tmp_path / "missing" / "*.png")
    out, err = capsys.readouterr()
    assert code == 1
    records = {Path(record["file"]).name: record for record in json.loads(out)}
    assert sorted(records) == ["also-good.jpg", "garbage.png", "gone.png", "good.png"]
    assert all(records[path.name]["predictions"] for path in good)
    assert records["garbage.png"]["error"].startswith("invalid_image: ")
    assert records["gone.png"]["error"] == "cannot read: No such file or directory"
    assert err.splitlines() == [
        "skipped 2 files:",
        f"  {tmp_path / 'photos' / 'garbage.png'}: {records['garbage.png']['error']}",
        f"  {tmp_path / 'photos' / 'gone.png'}: cannot read: No such file or directory",
        f"no image files match '{tmp_path / 'empty-folder.png'}'",
        f"no image files match '{tmp_path / 'missing' / '*.png'}'",
    ]

    assert run("--url", url, "--no-progress", tmp_path / "photos") == 1  # the table lists the classified only
    out, err = capsys.readouterr()
    assert sorted(Path(name).name for name in table_rows(out)) == ["also-good.jpg", "good.png"]
    assert "skipped 2 files:" in err


def test_an_unreachable_server_is_said_once_and_quickly(tmp_path: Path, capsys) -> None:
    write_images(tmp_path, *(f"{index}.png" for index in range(20)))
    port = free_port()  # nobody listens there
    started = time.monotonic()
    assert run("--url", f"http://127.0.0.1:{port}", tmp_path) == 1
    assert time.monotonic() - started < 5
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"classifier-predict: error: cannot reach http://127.0.0.1:{port} "
                                "([Errno 111] Connection refused): is the server running? (docker compose up)"]


@pytest.mark.parametrize("argv", [
    ["--url", "http://127.0.0.1:9"],  # the paths below name no image; nothing is sent
    ["--endpoint", "shapes", "--region", "us-east-1"],
])
def test_no_image_at_all_is_a_usage_error(argv: list[str], tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        run(*argv, tmp_path, tmp_path / "*.jpg")
    assert exit_info.value.code == 2
    assert "no image files found" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--url", "localhost:8080"], "--url needs http:// or https://"),
    (["--url", "http://127.0.0.1:9", "--region", "us-east-1"], "--region and --profile are for --endpoint"),
    (["--url", "http://127.0.0.1:9", "--top-k", "0"], "expected a positive int"),
    (["--endpoint", "shapes", "--url", "http://127.0.0.1:9"], "not allowed with argument"),
])
def test_bad_usage_exits_2(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    image, *_ = write_images(tmp_path, "a.png")
    with pytest.raises(SystemExit) as exit_info:
        run(*argv, image)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: classifier-predict") and "--endpoint NAME" in out and "--target-model" in out


def test_runs_as_python_dash_m() -> None:
    result = subprocess.run([sys.executable, "-m", "deploy.predict", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "classifier-predict" in result.stdout


def test_target_model_invokes_that_model_on_a_multi_model_server(tmp_path: Path, capsys) -> None:
    constant_artifact(tmp_path / "pets" / "model", ("cat", "dog"), "dog")
    paths = write_images(tmp_path / "photos", "a.png", "b.jpg", "c.png")
    with server(tmp_path, CLASSIFIER_MULTI_MODEL="true", CLASSIFIER_MODELS_ROOT=str(tmp_path)) as (address, _):
        loaded = httpx.post(f"{address}/models", json={"model_name": "pets", "url": str(tmp_path / "pets" / "model")},
                            timeout=60)
        assert loaded.status_code == 200, loaded.text
        assert run("--url", address, "--target-model", "pets", "--format", "json", tmp_path / "photos") == 0
        records = json.loads(capsys.readouterr().out)
        assert [record["file"] for record in records] == [str(path) for path in paths]
        assert all([p["label"] for p in record["predictions"]] == ["dog", "cat"] for record in records)

        # A model the server has not loaded: every file would get the same 404, so it is said once.
        assert run("--url", address, "--target-model", "horses", tmp_path / "photos") == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith(f"classifier-predict: error: POST {address}/models/horses/invoke: 404 model_not_found: ")
        assert len(err.splitlines()) == 1


class Loading(BaseHTTPRequestHandler):
    """A server whose model is still loading (ours says so for a moment only, too short to catch)."""

    requests: list[str] = []

    def do_GET(self) -> None:
        self.requests.append(f"GET {self.path}")
        body = b'{"status": "loading"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_server_still_loading_is_said_once(tmp_path: Path, capsys) -> None:
    write_images(tmp_path, "a.png", "b.png")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Loading)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert run("--url", address, tmp_path) == 1
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert capsys.readouterr().err == (f"classifier-predict: error: the server at {address} is still loading its "
                                       "model (GET /ping: 503); try again shortly\n")
    assert Loading.requests == ["GET /ping"]  # and no image sent


# --- a SageMaker endpoint through a stubbed sagemaker-runtime client -------------------------------


def runtime_client() -> object:
    return boto3.client("sagemaker-runtime", region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def streaming(body: dict) -> dict:
    raw = json.dumps(body).encode()
    return {"Body": StreamingBody(io.BytesIO(raw), len(raw)), "ContentType": "application/json",
            "InvokedProductionVariant": "AllTraffic"}


def predictions(label: str, runner_up: str) -> dict:
    return {"predictions": [{"label": label, "index": LABELS.index(label), "probability": 0.75},
                            {"label": runner_up, "index": LABELS.index(runner_up), "probability": 0.25}]}


def test_an_endpoint_is_invoked_once_per_image(tmp_path: Path, capsys) -> None:
    first, second = write_images(tmp_path, "a.png", "b.jpg")
    runtime = runtime_client()
    with Stubber(runtime) as stub:
        for path, kind, label in ((first, "image/png", "circle"), (second, "image/jpeg", "triangle")):
            stub.add_response("invoke_endpoint", streaming(predictions(label, "square")), expected_params={
                "EndpointName": "shapes", "TargetModel": "v2.tar.gz", "ContentType": kind,
                "Accept": "application/json", "CustomAttributes": "top_k=2", "Body": path.read_bytes()})
        code = run("--endpoint", "shapes", "--target-model", "v2.tar.gz", "--top-k", "2", "--concurrency", "1",
                   "--format", "csv", first, second, runtime_client=runtime)
        stub.assert_no_pending_responses()
    assert code == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows == [["file", "rank", "label", "index", "probability"],
                    [str(first), "1", "circle", "0", "0.75"], [str(first), "2", "square", "1", "0.25"],
                    [str(second), "1", "triangle", "2", "0.75"], [str(second), "2", "square", "1", "0.25"]]


def test_a_model_error_skips_that_image_only(tmp_path: Path, capsys) -> None:
    bad, good = write_images(tmp_path, "a.png", "b.png")
    runtime = runtime_client()
    with Stubber(runtime) as stub:
        stub.add_client_error(
            "invoke_endpoint", service_error_code="ModelError", http_status_code=424,
            service_message="Received client error (400) from primary with message ...",
            modeled_fields={"OriginalStatusCode": 400, "OriginalMessage": json.dumps(
                {"error": {"code": "invalid_image", "message": "the body is not an image"}})})
        stub.add_response("invoke_endpoint", streaming(predictions("square", "circle")))
        code = run("--endpoint", "shapes", "--concurrency", "1", "--format", "json", bad, good,
                   runtime_client=runtime)
    assert code == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == [{"file": str(bad), "error": "invalid_image: the body is not an image"},
                               {"file": str(good), **predictions("square", "circle")}]
    assert err == f"skipped 1 file:\n  {bad}: invalid_image: the body is not an image\n"


def test_an_unknown_endpoint_is_said_once(tmp_path: Path, capsys) -> None:
    paths = write_images(tmp_path, "a.png", "b.png", "c.png")
    runtime = runtime_client()
    with Stubber(runtime) as stub:
        stub.add_client_error("invoke_endpoint", service_error_code="ValidationError", http_status_code=400,
                              service_message="Endpoint shapes of account 123456789012 not found.")
        code = run("--endpoint", "shapes", "--concurrency", "1", *paths, runtime_client=runtime)
    assert code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "classifier-predict: error: endpoint shapes not found in us-east-1\n"


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_missing_credentials_are_said_once(no_credentials: None, tmp_path: Path, capsys) -> None:
    paths = write_images(tmp_path, "a.png", "b.png", "c.png")
    # A session of its own: boto3's default session may hold credentials another test resolved.
    runtime = boto3.session.Session(region_name="us-east-1").client("sagemaker-runtime")
    assert run("--endpoint", "shapes", *paths, runtime_client=runtime) == 1
    assert capsys.readouterr().err == (
        "classifier-predict: error: no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, pass --profile, or run aws configure)\n")

    # The same when the command builds its own client.
    assert run("--endpoint", "shapes", "--region", "eu-west-1", *paths) == 1
    assert "no AWS credentials found" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ([], "no AWS region: pass --region or set AWS_REGION"),
    (["--region", "us-east-1", "--profile", "nobody"], "AWS profile 'nobody' not found"),
])
def test_missing_aws_configuration_is_reported(no_credentials: None, argv: list[str], message: str,
                                               tmp_path: Path, capsys) -> None:
    image, *_ = write_images(tmp_path, "a.png")
    assert run("--endpoint", "shapes", *argv, image) == 1
    assert message in capsys.readouterr().err
