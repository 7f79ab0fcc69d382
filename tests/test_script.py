"""Script mode: the user's own training script, run the way SageMaker's PyTorch container runs it.

Each job is laid out as SageMaker lays it out (hyperparameters JSON-encoded once by the SDK, every
value a string) under a base folder of the test's own, and ``python -m train`` runs it for real.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from train import script
from train.__main__ import main

REPO = Path(__file__).resolve().parents[1]

# What users write for SageMaker's PyTorch estimator: argparse with SM_* defaults.
TRAIN_PY = textwrap.dedent('''
    import argparse, json, os, sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", "--learning_rate", type=float, default=0.1)
    parser.add_argument("--layers", type=str, default="")
    parser.add_argument("--model-dir", type=str, default=os.environ["SM_MODEL_DIR"])
    parser.add_argument("--train", type=str, default=os.environ["SM_CHANNEL_TRAINING"])
    args = parser.parse_args()
    if args.epochs < 0:
        raise ValueError(f"epochs must not be negative, got {args.epochs}")
    seen = {key: value for key, value in os.environ.items() if key.startswith(("SM_", "MASTER_"))}
    with open(os.path.join(args.model_dir, "run.json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "args": vars(args), "env": seen, "cwd": os.getcwd(),
                   "files": sorted(os.listdir(args.train)), "path": sys.path[:3]}, f)
    print("metric: loss=0.5", flush=True)
''')


def sdk_hyperparameters(values: dict[str, object]) -> dict[str, str]:
    """hyperparameters.json as the SageMaker SDK writes it: every value json.dumps-ed once."""
    return {key: json.dumps(value) for key, value in values.items()}


def job_folder(base: Path, source: str, user: dict[str, object], *, extra: dict[str, object] | None = None,
               hosts: tuple[str, ...] = ("algo-1",), current: str = "algo-1") -> Path:
    config = base / "input" / "config"
    config.mkdir(parents=True)
    values = {**user, "sagemaker_program": "train.py", "sagemaker_submit_directory": source,
              "sagemaker_container_log_level": 20, "sagemaker_job_name": "job-1", "sagemaker_region": "us-east-1",
              **(extra or {})}
    (config / "hyperparameters.json").write_text(json.dumps(sdk_hyperparameters(values)))
    (config / "inputdataconfig.json").write_text(json.dumps({
        "training": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
    }))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": current, "hosts": list(hosts), "network_interface_name": "eth0"}))
    (base / "input" / "data" / "training").mkdir(parents=True)
    (base / "input" / "data" / "training" / "a.txt").write_text("data")
    (base / "model").mkdir()
    return base


def source_dir(folder: Path, train_py: str = TRAIN_PY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(train_py)
    (folder / "helper.py").write_text("VALUE = 42\n")
    return folder


def run_job(base: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base)}
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_arguments_are_formatted_as_the_training_toolkit_does() -> None:
    values = {"epochs": 10, "lr": 0.1, "layers": [64, 128], "flag": True, "opts": {"a": 1, "b": "x"}, "k": "v",
              "name": "resnet"}
    assert script.to_args(values) == ["--epochs", "10", "--flag", "True", "-k", "v", "--layers", "[64, 128]",
                                      "--lr", "0.1", "--name", "resnet", "--opts", "a=1,b=x"]


def test_values_are_json_decoded_else_kept_as_sent() -> None:
    assert [script.decode(v) for v in ('"train.py"', "10", "0.5", "true", "[1, 2]", "plain text")] == [
        "train.py", 10, 0.5, True, [1, 2], "plain text"]


def test_every_sm_variable_a_script_reads(tmp_path: Path) -> None:
    base = job_folder(tmp_path / "ml", "s3://bucket/job/source/sourcedir.tar.gz",
                      {"epochs": 3, "learning-rate": 0.01, "layers": [64, 128]},
                      extra={"sagemaker_torch_distributed_enabled": True}, hosts=("algo-2", "algo-1"),
                      current="algo-2")
    (base / "input" / "data" / "validation").mkdir()
    job = script.read_job(base, {}, num_gpus=0)
    assert job is not None
    env = script.environment(job)
    expected = {
        "SM_HOSTS": '["algo-1","algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": str(os.cpu_count()), "SM_NETWORK_INTERFACE_NAME": "eth0", "SM_LOG_LEVEL": "20",
        "SM_MODEL_DIR": f"{base}/model", "SM_INPUT_DIR": f"{base}/input", "SM_INPUT_CONFIG_DIR": f"{base}/input/config",
        "SM_OUTPUT_DIR": f"{base}/output", "SM_OUTPUT_DATA_DIR": f"{base}/output/data",
        "SM_OUTPUT_INTERMEDIATE_DIR": f"{base}/output/intermediate",
        "SM_CHANNELS": '["training","validation"]', "SM_CHANNEL_TRAINING": f"{base}/input/data/training",
        "SM_CHANNEL_VALIDATION": f"{base}/input/data/validation",
        "SM_HPS": '{"epochs":3,"layers":[64,128],"learning-rate":0.01}',
        "SM_HP_EPOCHS": "3", "SM_HP_LEARNING-RATE": "0.01", "SM_HP_LAYERS": "[64,128]",
        "SM_USER_ARGS": '["--epochs","3","--layers","[64, 128]","--learning-rate","0.01"]',
        "SM_MODULE_NAME": "train", "SM_MODULE_DIR": "s3://bucket/job/source/sourcedir.tar.gz",
        "SM_USER_ENTRY_POINT": "train.py", "SM_FRAMEWORK_PARAMS": '{"sagemaker_torch_distributed_enabled":true}',
        "SM_CURRENT_INSTANCE_TYPE": "local", "SM_CURRENT_INSTANCE_GROUP": "homogeneousCluster",
        "SM_IS_HETERO": "false", "MASTER_ADDR": "algo-1", "MASTER_PORT": "7777",
    }
    assert {key: env.get(key) for key in expected} == expected
    training_env = json.loads(env["SM_TRAINING_ENV"])
    assert training_env["channel_input_dirs"] == {"training": f"{base}/input/data/training",
                                                  "validation": f"{base}/input/data/validation"}
    assert training_env["hyperparameters"] == {"epochs": 3, "learning-rate": 0.01, "layers": [64, 128]}
    assert training_env["master_hostname"] == "algo-1" and training_env["is_master"] is False
    assert training_env["job_name"] == "job-1"
    assert "user_args" not in training_env
    command = script.command_for(job)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[3:11] == ["--nnodes", "2", "--nproc_per_node", "1", "--redirects", "2", "--tee", "2"]
    at = command.index("--master_addr")
    assert command[at:at + 6] == ["--master_addr", "algo-1", "--master_port", "7777", "--node_rank", "1"]


def test_the_failure_names_the_error_whatever_marks_torchrun_and_torch_put_on_the_lines() -> None:
    """torchrun marks each line with the local rank's [default<n>]:, and torch.distributed's
    excepthook marks a traceback's lines with [rank<n>]: once a process group exists."""
    lines = ["[default1]:[rank1]: Traceback (most recent call last):",
             "[default1]:[rank1]:   File \"train.py\", line 4, in <module>",
             "[default1]:[rank1]: ValueError: bad epochs",
             "[default0]:Traceback (most recent call last):",
             "[default0]:ValueError: bad epochs",
             "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: "]
    tail = script.Tail(io.StringIO("\n".join(lines) + "\n"), io.StringIO())
    tail.join()
    assert tail.last_error() == "ValueError: bad epochs"


def test_a_job_without_a_program_is_not_script_mode(tmp_path: Path) -> None:
    config = tmp_path / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text('{"epochs": "3"}')
    assert script.read_job(tmp_path, {}, num_gpus=0) is None


def test_the_users_script_runs_with_its_arguments_environment_and_code(tmp_path: Path) -> None:
    base = job_folder(tmp_path / "ml", f"file://{source_dir(tmp_path / 'src')}", {"epochs": 2, "learning_rate": 0.05})
    run = run_job(base)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "metric: loss=0.5" in run.stdout  # stdout passes through for metric definitions
    record = json.loads((base / "model" / "run.json").read_text())
    assert record["argv"] == ["--epochs", "2", "--learning_rate", "0.05"]
    assert record["args"]["learning_rate"] == 0.05 and record["args"]["model_dir"] == f"{base}/model"
    assert record["files"] == ["a.txt"]
    assert record["cwd"] == f"{base}/code" and f"{base}/code" in record["path"]
    assert (base / "output" / "success").exists()
    assert not (base / "output" / "failure").exists()
    assert (base / "code" / "helper.py").is_file()


def test_a_source_tarball_is_unpacked(tmp_path: Path) -> None:
    source = source_dir(tmp_path / "src")
    archive = tmp_path / "sourcedir.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in source.iterdir():
            tar.add(path, arcname=path.name)
    base = job_folder(tmp_path / "ml", str(archive), {"epochs": 1})
    run = run_job(base)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((base / "model" / "run.json").read_text())["argv"] == ["--epochs", "1"]


def test_a_source_in_s3_is_downloaded_and_unpacked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moto import mock_aws

    source = source_dir(tmp_path / "src")
    archive = tmp_path / "sourcedir.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "train.py", arcname="train.py")
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    base = job_folder(tmp_path / "ml", "s3://code-bucket/job-1/source/sourcedir.tar.gz", {"epochs": 4})
    with mock_aws():
        import boto3

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="code-bucket")
        s3.upload_file(str(archive), "code-bucket", "job-1/source/sourcedir.tar.gz")
        assert main([], {"SAGEMAKER_BASE_DIR": str(base), "PATH": os.environ["PATH"]}) == 0
    assert json.loads((base / "model" / "run.json").read_text())["argv"] == ["--epochs", "4"]


def test_a_failing_script_fails_the_job_with_its_exit_code_and_last_error(tmp_path: Path) -> None:
    base = job_folder(tmp_path / "ml", str(source_dir(tmp_path / "src")), {"epochs": -1})
    run = run_job(base)
    assert run.returncode == 1
    failure = (base / "output" / "failure").read_text()
    assert failure.startswith("ExecuteUserScriptError:\nExitCode 1\n")
    assert 'ErrorMessage "ValueError: epochs must not be negative, got -1"' in failure
    assert "Traceback" in run.stderr  # the script's stderr passes through to the job's log

    (tmp_path / "exit3").mkdir()
    (tmp_path / "exit3" / "train.py").write_text("import sys\nprint('giving up', file=sys.stderr)\nsys.exit(3)\n")
    base = job_folder(tmp_path / "ml3", str(tmp_path / "exit3"), {})
    run = run_job(base)
    assert run.returncode == 3
    assert "ExitCode 3" in (base / "output" / "failure").read_text()
    assert "giving up" in (base / "output" / "failure").read_text()


def test_a_misspelt_hyperparameter_reaches_the_script_which_rejects_it(tmp_path: Path) -> None:
    base = job_folder(tmp_path / "ml", str(source_dir(tmp_path / "src")), {"epochz": 2})
    run = run_job(base)
    assert run.returncode == 2  # argparse's exit status
    failure = (base / "output" / "failure").read_text()
    assert "unrecognized arguments: --epochz 2" in failure


def test_a_missing_entry_point_or_source_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.py").write_text("")
    base = job_folder(tmp_path / "ml", str(tmp_path / "empty"), {})
    assert run_job(base).returncode == 1
    assert "the entry point 'train.py' is not in the source (it holds: other.py)" in (
        base / "output" / "failure").read_text()
    base = job_folder(tmp_path / "ml2", str(tmp_path / "nowhere"), {})
    assert run_job(base).returncode == 1
    assert "neither a folder, a tarball nor an s3:// URI" in (base / "output" / "failure").read_text()


def test_mpi_based_distributions_are_refused_with_the_alternative(tmp_path: Path) -> None:
    base = job_folder(tmp_path / "ml", str(source_dir(tmp_path / "src")), {},
                      extra={"sagemaker_pytorch_ddp_enabled": True})
    assert run_job(base).returncode == 1
    assert "torch_distributed" in (base / "output" / "failure").read_text()


def test_sigterm_reaches_the_script(tmp_path: Path) -> None:
    """SageMaker stops a job (and a spot instance goes) with SIGTERM: the script must get it."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text(textwrap.dedent('''
        import os, pathlib, signal, sys, time
        model = pathlib.Path(os.environ["SM_MODEL_DIR"])
        def stop(signum, frame):
            (model / "stopped").write_text("checkpointed")
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        (model / "ready").write_text("")
        time.sleep(120)
    '''))
    base = job_folder(tmp_path / "ml", str(tmp_path / "src"), {})
    process = subprocess.Popen([sys.executable, "-m", "train"], cwd=REPO, text=True,
                               env={**os.environ, "SAGEMAKER_BASE_DIR": str(base)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (base / "model" / "ready").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 143
    finally:
        process.kill()
    assert (base / "model" / "stopped").read_text() == "checkpointed"


def test_torch_distributed_runs_the_script_under_torchrun(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text(textwrap.dedent('''
        import os, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        total = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(total)
        out = os.path.join(os.environ["SM_MODEL_DIR"], f"rank-{dist.get_rank()}.txt")
        open(out, "w").write(f"{os.environ['WORLD_SIZE']} {os.environ['LOCAL_RANK']} {total.item()}")
        dist.destroy_process_group()
    '''))
    base = job_folder(tmp_path / "ml", str(tmp_path / "src"), {},
                      extra={"sagemaker_torch_distributed_enabled": True, "sagemaker_instance_type": "local",
                             "sagemaker_mpi_num_of_processes_per_host": 2})
    run = run_job(base, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (base / "model" / "rank-0.txt").read_text() == "2 0 3.0"
    assert (base / "model" / "rank-1.txt").read_text() == "2 1 3.0"


def test_the_first_error_of_a_failing_torchrun_job_is_reported(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text("raise ValueError('bad epochs')\n")
    base = job_folder(tmp_path / "ml", str(tmp_path / "src"), {},
                      extra={"sagemaker_torch_distributed_enabled": True, "sagemaker_mpi_num_of_processes_per_host": 2})
    run = run_job(base, timeout=180)
    assert run.returncode != 0
    failure = (base / "output" / "failure").read_text()
    assert 'ErrorMessage "ValueError: bad epochs"' in failure, failure
    assert "ChildFailedError" in run.stderr  # torchrun's own summary is still in the log


def test_a_failure_reason_the_script_wrote_itself_is_kept(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text(textwrap.dedent('''
        import os, sys
        with open(os.path.join(os.environ["SM_OUTPUT_DIR"], "failure"), "w") as f:
            f.write("dataset has no images of class 'beagle'")
        sys.exit(4)
    '''))
    base = job_folder(tmp_path / "ml", str(tmp_path / "src"), {})
    assert run_job(base).returncode == 4
    assert (base / "output" / "failure").read_text() == "dataset has no images of class 'beagle'"


def test_a_shell_entry_point_runs_under_its_own_shebang(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.sh").write_text(textwrap.dedent('''\
        #!/bin/bash
        if [[ "$1" == "--epochs" ]]; then echo "bash got $2" > "$SM_MODEL_DIR/out.txt"; fi
    '''))
    base = job_folder(tmp_path / "ml", str(tmp_path / "src"), {"epochs": 2},
                      extra={"sagemaker_program": "train.sh"})
    run = run_job(base)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (base / "model" / "out.txt").read_text() == "bash got 2\n"


def test_setup_py_and_requirements_txt_are_both_installed(tmp_path: Path) -> None:
    assert script.requirements_command(tmp_path) is None
    (tmp_path / "requirements.txt").write_text("humanize\n")
    assert script.requirements_command(tmp_path)[3:] == ["install", "--no-input", "-r", "requirements.txt"]
    (tmp_path / "setup.py").write_text("")
    assert script.requirements_command(tmp_path)[3:] == ["install", "--no-input", ".", "-r", "requirements.txt"]
