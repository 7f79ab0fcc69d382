"""deploy/check.py: the contract self-check on our image, on a broken image, and its report."""

from __future__ import annotations

import argparse
import json
import tempfile
import uuid
from pathlib import Path

import pytest

from deploy import check, host
from deploy.check import FAIL, PASS, SKIP, WARN, Item, Report

from containers import docker, image_for

# Small, fast values our own image accepts; another image would get only what --hp gives it.
FAST = {"epochs": "1", "architecture": "resnet18", "pretrained": "false", "image_size": "32", "batch_size": "8",
        "workers": "0"}
ITEMS = (
    "platform linux/amd64", "runs as root", "train exits 0", "artifact written", "failure file on a broken config",
    "serve starts", "TCP accept within 250 ms of start", "/ping 200 within 4 minutes", "POST /invocations image/jpeg",
    "POST /invocations image/png", "POST /invocations application/x-image", "6 MB+ body", "unknown headers ignored",
    "SIGTERM within 30 s", "SAGEMAKER_BIND_TO_PORT", "no argument + training config: trains",
    "no argument, no config: serves",
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy")
    check.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["check", *argv])


def leftover_containers() -> list[str]:
    return docker("ps", "-a", "--filter", "name=contract-check-", "--format", "{{.Names}}").stdout.split()


# --- the real images -------------------------------------------------------------------------


@pytest.mark.container
def test_our_image_passes_the_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the check's /opt/ml folders go here
    args = parse(image_for("cpu"), "--json", *(f"--hp={key}={value}" for key, value in FAST.items()))

    code = check.cmd_check(args)

    report = json.loads(capsys.readouterr().out)
    statuses = {item["name"]: item["status"] for item in report["items"]}
    assert tuple(statuses) == ITEMS
    # Every item passes, the port's 250 ms included: the server listens before it imports PyTorch
    # (about 45 ms after the container's start here).
    assert all(status == PASS for status in statuses.values()), json.dumps(report, indent=2)
    accept = next(item for item in report["items"] if item["name"] == "TCP accept within 250 ms of start")
    print(f"accepted {accept['seconds'] * 1000:.0f} ms after the container's start")
    assert code == 0 and report["exit_code"] == 0 and report["passed"] is True
    assert "413" in next(item["detail"] for item in report["items"] if item["name"] == "6 MB+ body")
    assert leftover_containers() == []
    assert list(tmp_path.iterdir()) == []  # every temporary /opt/ml removed


BROKEN_ENTRYPOINT = '''\
import signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

if sys.argv[1:] == ["train"]:  # "succeeds" whatever the config, and never writes a failure file
    Path("/opt/ml/model/weights.bin").write_bytes(b"0")
elif sys.argv[1:] == ["serve"]:  # unhealthy, on 8080 whatever SAGEMAKER_BIND_TO_PORT says, deaf to SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    class Unhealthy(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

    HTTPServer(("", 8080), Unhealthy).serve_forever()
else:  # no argument: no mode inferred
    sys.exit(3)
'''


@pytest.fixture
def broken_image(tmp_path: Path):
    """Our image (so its labels stay) with an entrypoint that breaks the contract in known ways."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "broken.py").write_text(BROKEN_ENTRYPOINT)
    (context / "Dockerfile").write_text(f'FROM {image_for("cpu")}\nCOPY broken.py /broken.py\n'
                                        'ENTRYPOINT ["python", "/broken.py"]\n')
    tag = f"contract-check-broken:{uuid.uuid4().hex[:8]}"
    docker("build", "-q", "-t", tag, str(context), timeout=300)
    yield tag
    docker("image", "rm", "-f", tag, check=False)


@pytest.mark.container
def test_a_broken_image_fails_the_right_items(broken_image: str) -> None:
    seen: list[Item] = []
    # Shorter waits than SageMaker's 4 minutes and 30 s keep this test quick.
    report = check.run_check(broken_image, train_timeout_s=120, ping_deadline_s=5, stop_timeout_s=3,
                             progress=seen.append)

    assert seen == report.items
    status = {item.name: item.status for item in report.items}
    assert status["train exits 0"] == PASS and status["artifact written"] == PASS
    assert status["failure file on a broken config"] == FAIL
    assert "exit code 0" in report.item("failure file on a broken config").detail
    assert status["serve starts"] == PASS
    assert status["/ping 200 within 4 minutes"] == FAIL
    assert "500" in report.item("/ping 200 within 4 minutes").detail
    assert status["POST /invocations image/jpeg"] == SKIP
    assert status["SIGTERM within 3 s"] == FAIL and "137" in report.item("SIGTERM within 3 s").detail
    assert status["SAGEMAKER_BIND_TO_PORT"] == FAIL and "9090" in report.item("SAGEMAKER_BIND_TO_PORT").detail
    assert status["no argument + training config: trains"] == WARN
    assert status["no argument, no config: serves"] == WARN
    assert "exited with code 3" in report.item("no argument, no config: serves").detail
    assert report.exit_code == 1
    assert leftover_containers() == []


@pytest.mark.container
def test_a_missing_image_is_an_error() -> None:
    with pytest.raises(check.CheckError, match="no-such-image"):
        check.run_check(f"contract-check-no-such-image:{uuid.uuid4().hex[:8]}")


# --- the report, without Docker --------------------------------------------------------------


def report_of(*statuses: str) -> Report:
    return Report("img:tag", [Item(f"item {index}", status, f"why {index}", 0.5 * index)
                              for index, status in enumerate(statuses)])


@pytest.mark.parametrize(("statuses", "code"), [
    ((), 0), ((PASS,), 0), ((PASS, WARN, SKIP), 0), ((PASS, FAIL), 1), ((FAIL, FAIL, WARN), 1),
])
def test_exit_code_is_1_only_when_an_item_failed(statuses: tuple[str, ...], code: int) -> None:
    report = report_of(*statuses)
    assert report.exit_code == code
    assert report.passed is (code == 0)


def test_json_lists_every_item_and_the_counts() -> None:
    data = json.loads(json.dumps(report_of(PASS, FAIL, WARN, SKIP, PASS).to_dict()))
    assert data["image"] == "img:tag" and data["passed"] is False and data["exit_code"] == 1
    assert data["counts"] == {PASS: 2, FAIL: 1, WARN: 1, SKIP: 1}
    assert data["items"][1] == {"name": "item 1", "status": FAIL, "passed": False, "seconds": 0.5,
                                "detail": "why 1"}
    assert [item["passed"] for item in data["items"]] == [True, False, True, True, True]


def test_table_shows_item_result_time_and_detail() -> None:
    lines = check.render_table(report_of(PASS, WARN, FAIL)).splitlines()
    assert lines[0].split() == ["item", "result", "time", "detail"]
    assert lines[2].split() == ["item", "0", PASS, "0", "ms", "why", "0"]
    assert lines[3].split() == ["item", "1", WARN, "500", "ms", "why", "1"]
    assert lines[4].split() == ["item", "2", FAIL, "1.0", "s", "why", "2"]
    column = lines[0].index("result")
    assert [line[column:column + 4] for line in lines[2:5]] == [PASS, WARN, FAIL]  # aligned
    assert lines[-1] == "img:tag: FAILED (1 PASS, 1 FAIL, 1 WARN)"


@pytest.mark.parametrize("as_json", [False, True])
def test_the_command_prints_the_report_and_returns_its_exit_code(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], as_json: bool) -> None:
    calls = []

    def fake_run_check(image: str, **options: object) -> Report:
        calls.append((image, options))
        return report_of(PASS, FAIL)

    monkeypatch.setattr(check, "run_check", fake_run_check)
    args = parse("img:tag", "--hp", "epochs=2", "--hp", "lr=0.1", "--broken-hp", "epochs=x", "--timeout", "60",
                 *(["--json"] if as_json else []))

    assert check.cmd_check(args, None, {}) == 1
    out = capsys.readouterr().out
    assert (json.loads(out)["exit_code"] == 1) if as_json else ("img:tag: FAILED" in out)
    image, options = calls[0]
    assert image == "img:tag"
    assert options["hyperparameters"] == {"epochs": "2", "lr": "0.1"}
    assert options["broken_hyperparameters"] == {"epochs": "x"}
    assert options["train_timeout_s"] == 60 and options["skip_train"] is False and options["model_dir"] is None


def test_defaults_send_no_hyperparameters_and_break_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse("img:tag")
    assert args.hp == [] and args.broken_hp == [] and args.timeout == 900 and not args.json
    written: list[dict[str, str]] = []
    monkeypatch.setattr(check.Checker, "image_items", lambda self: {})
    monkeypatch.setattr(check.Checker, "train", lambda self, base, command=("train",): (
        written.append(json.loads((base / "input/config/hyperparameters.json").read_text())) or (1, 0.0, "")))
    monkeypatch.setattr(check, "docker", lambda *args, **kw: None)

    report = check.run_check("img:tag")

    assert written == [{}, {"epochs": "not-a-number"}, {}]  # train, broken config, no argument
    assert report.item("train exits 0").status == FAIL
    assert report.item("serve starts").status == SKIP  # training wrote no model


def test_bad_key_value_and_model_dir_without_skip_train(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse("img:tag", "--hp", "no-equals-sign")
    with pytest.raises(ValueError, match="skip_train"):
        check.run_check("img:tag", model_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        check.run_check("img:tag", skip_train=True, model_dir=tmp_path / "missing")


def test_opt_ml_is_written_the_way_sagemaker_writes_it(tmp_path: Path) -> None:
    base = check.write_opt_ml(tmp_path / "ml", {"epochs": "1", "lr": "0.1"})
    config = base / "input" / "config"
    hyperparameters = json.loads((config / "hyperparameters.json").read_text())
    assert hyperparameters == {"epochs": "1", "lr": "0.1"}
    assert all(isinstance(value, str) for value in hyperparameters.values())
    channels = json.loads((config / "inputdataconfig.json").read_text())
    assert set(channels) == {"training", "validation"}
    assert channels["training"]["TrainingInputMode"] == "File"
    resources = json.loads((config / "resourceconfig.json").read_text())
    assert resources["current_host"] == "algo-1" and resources["hosts"] == ["algo-1"]
    training = base / "input" / "data" / "training"
    assert sorted(path.name for path in training.iterdir()) == ["circle", "square", "triangle"]
    assert len(list(training.rglob("*.png"))) == 24
    assert len(list((base / "input" / "data" / "validation").rglob("*.png"))) == 12
    assert (base / "model").is_dir() and not any((base / "model").iterdir())
    broken = check.write_opt_ml(tmp_path / "broken", {}, data=False)
    assert set(json.loads((broken / "input/config/inputdataconfig.json").read_text())) == {"training"}
    assert not (broken / "input" / "data").exists()


def test_docker_times_with_nanoseconds_parse() -> None:
    assert host.parse_docker_time("2024-05-01T10:00:00.123456789Z\n") == pytest.approx(1714557600.123456)
    assert host.parse_docker_time("2024-05-01T10:00:00Z") == 1714557600.0
    assert host.parse_docker_time("") is None


def test_a_closed_port_does_not_count_as_accepting() -> None:
    assert host.connection_accepted(host.free_port()) is False
