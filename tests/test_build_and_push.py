"""build_and_push.sh against a real local registry and against ECR as emulated by moto.

- ``--registry``: both variants go to Debian's ``docker-registry`` on 127.0.0.1; the registry holds
  every tag and blob, and a pushed image pulls back and serves.
- ECR: moto's server (``AWS_ENDPOINT_URL``) stands in for STS and ECR, so account lookup,
  repository creation (scan on push, tag immutability, lifecycle policy) and the tag checks run
  for real. moto does not speak the registry protocol, so ``docker login``/``docker push`` to ECR
  are only checked as printed commands (``--dry-run``); ``--no-push`` covers the rest.
- ``--dry-run`` changes nothing; usage errors, a missing Docker, missing credentials or region
  and a failed build end with a clear message and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from containers import docker, image_for, serving
from imagedata import encode, render
from ports import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "build_and_push.sh"
ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
ECR_HOST = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
VERSION = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
MANIFEST_TYPES = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"



def wait_for_http(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args[0]} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no 200 from {url} within {timeout_s} s")


def docker_works() -> bool:
    if not shutil.which("docker"):
        return False
    return docker("version", "--format", "{{.Server.Version}}", timeout=30, check=False).returncode == 0


needs_docker = pytest.mark.skipif(not docker_works(), reason="needs a Docker engine")


def run_script(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def git_tag_pattern() -> str:
    """The commit tag the script should use: ``<sha>`` or ``<sha>-dirty`` (others edit the tree)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return re.escape(sha) + "(-dirty)?"


def local_refs(fragment: str) -> set[str]:
    listing = docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    return {ref for ref in listing if fragment in ref}


def untag(refs: set[str] | list[str]) -> None:
    for ref in refs:
        docker("image", "rm", ref, check=False)


def base_env() -> dict[str, str]:
    """This environment without any AWS setting, with the test venv's ``aws`` first on PATH.

    BASE_IMAGE / TORCH_INDEX_URL pass through (tests/run.sh sets them), so the script builds the
    same content-tagged images as the rest of the suite and finds them cached.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(AWS_EC2_METADATA_DISABLED="true",  # never look for instance credentials off-host
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env


# ---- moto --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/moto-api/", 30, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def aws_env(moto_url: str) -> dict[str, str]:
    if not shutil.which("aws", path=base_env()["PATH"]):
        pytest.skip("the AWS CLI is not installed (pip install awscli)")
    return base_env() | {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing",
                         "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}


@pytest.fixture
def ecr(moto_url: str):
    return boto3.client("ecr", region_name=REGION, endpoint_url=moto_url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def unique_repository() -> str:
    return f"classifier-test-{uuid.uuid4().hex[:8]}"


# ---- usage and errors ---------------------------------------------------------------------------

def test_help_lists_the_flags_and_the_environment() -> None:
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--registry", "--repository", "--region", "--account", "--version", "--base-image",
                 "--torch-index-url", "--platform", "--untagged-days", "--force", "--no-push", "--dry-run",
                 "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL", "linux/amd64",
                 "IMMUTABLE_WITH_EXCLUSION", "latest-<variant>"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("args, message", [
    (["arm"], "unknown variant 'arm'"),
    (["--bogus", "cpu"], "unknown option '--bogus'"),
    (["cpu", "gpu"], "one variant argument only"),
    (["--registry"], "--registry needs a value"),
    (["--registry", "http://127.0.0.1:5000", "cpu"], "takes a host, not a URL"),
    (["--repository", "Upper", "cpu"], "invalid repository name"),
])
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    result = run_script(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_missing_docker_is_reported(tmp_path: Path) -> None:
    result = subprocess.run(["/bin/bash", str(SCRIPT), "--registry", "127.0.0.1:9", "cpu"], cwd=ROOT,
                            env={"PATH": str(tmp_path)}, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert "docker is not installed" in result.stderr


@needs_docker
def test_an_unreachable_docker_engine_is_reported(tmp_path: Path) -> None:
    env = base_env() | {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    result = run_script("--registry", "127.0.0.1:9", "cpu", env=env)
    assert result.returncode == 1
    assert "no Docker engine answers" in result.stderr


@needs_docker
def test_missing_credentials_are_reported(moto_url: str) -> None:
    if not shutil.which("aws", path=base_env()["PATH"]):
        pytest.skip("the AWS CLI is not installed (pip install awscli)")
    env = base_env() | {"AWS_ENDPOINT_URL": moto_url, "AWS_DEFAULT_REGION": REGION}
    result = run_script("--dry-run", "cpu", env=env)
    assert result.returncode == 1
    assert "no usable AWS credentials" in result.stderr
    assert "Unable to locate credentials" in result.stderr  # the CLI's own reason comes along
    assert result.stdout == ""


@needs_docker
def test_missing_region_is_reported(aws_env: dict[str, str]) -> None:
    env = {key: value for key, value in aws_env.items() if key != "AWS_DEFAULT_REGION"}
    result = run_script("--dry-run", "cpu", env=env)
    assert result.returncode == 1
    assert "no AWS region" in result.stderr


@needs_docker
@pytest.mark.parametrize("args, env, host", [
    ([], {}, ECR_HOST),
    ([], {"AWS_REGION": "eu-west-1"}, f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com"),
    (["--region", "ap-south-1"], {"AWS_REGION": "eu-west-1"}, f"{ACCOUNT}.dkr.ecr.ap-south-1.amazonaws.com"),
    (["--account", "111122223333"], {}, f"111122223333.dkr.ecr.{REGION}.amazonaws.com"),
    (["--region", "cn-north-1"], {}, f"{ACCOUNT}.dkr.ecr.cn-north-1.amazonaws.com.cn"),
])
def test_account_and_region_lookup_order(aws_env: dict[str, str], args: list[str], env: dict[str, str],
                                         host: str) -> None:
    # --region > AWS_REGION > AWS_DEFAULT_REGION (us-east-1 here); --account > STS (moto's account).
    result = run_script("--dry-run", *args, "cpu", env=aws_env | env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{host}/sagemaker-classifier:{VERSION}-cpu"


@needs_docker
def test_failed_build_is_reported(tmp_path: Path) -> None:
    # A base image on a closed local port: the build fails at once, without leaving 127.0.0.1.
    closed = f"127.0.0.1:{free_port()}"
    result = run_script("--registry", closed, "--base-image", f"{closed}/no-such-base:1", "cpu",
                        env=base_env())
    assert result.returncode == 1
    assert "building the cpu image failed" in result.stderr
    assert "no-such-base" in result.stderr  # the builder's own error is shown
    assert result.stdout == ""


# ---- ECR (moto) ---------------------------------------------------------------------------------

@needs_docker
def test_dry_run_prints_every_step_and_changes_nothing(aws_env: dict[str, str], ecr) -> None:
    repository = unique_repository()
    target = f"{ECR_HOST}/{repository}"
    # Other engineers may build images meanwhile, so compare what this run could have created.
    before = local_refs(repository)
    repositories_before = {r["repositoryName"] for r in ecr.describe_repositories()["repositories"]}

    result = run_script("--dry-run", "--repository", repository, "both", env=aws_env)

    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stderr.splitlines() if line.startswith("+ ")]
    text = "\n".join(steps)
    assert f"+ aws ecr create-repository --region {REGION} --repository-name {repository}" in text
    assert "scanOnPush=true" in text and "IMMUTABLE_WITH_EXCLUSION" in text
    assert f"+ aws ecr put-lifecycle-policy --region {REGION} --repository-name {repository}" in text
    for variant in ("cpu", "gpu"):
        assert re.search(rf"^\+ env PLATFORM=linux/amd64 .*container/build-image\.sh {variant}$", text, re.MULTILINE)
        for tag in (f"{VERSION}-{variant}", f"latest-{variant}"):
            assert re.search(rf"^\+ docker tag \S+ {re.escape(target)}:{tag}$", text, re.MULTILINE)
            assert f"+ docker push {target}:{tag}" in text
    assert (f"+ aws ecr get-login-password --region {REGION} | "
            f"docker login --username AWS --password-stdin {ECR_HOST}") in text
    assert "build-image: building" not in result.stderr
    pattern = git_tag_pattern()
    assert [re.sub(pattern, "<sha>", line) for line in result.stdout.splitlines()] == [
        f"{target}:{VERSION}-cpu", f"{target}:<sha>-cpu", f"{target}:latest-cpu",
        f"{target}:{VERSION}-gpu", f"{target}:<sha>-gpu", f"{target}:latest-gpu",
    ]

    assert {r["repositoryName"] for r in ecr.describe_repositories()["repositories"]} == repositories_before
    assert local_refs(repository) == before == set()


@pytest.mark.container
@needs_docker
def test_ecr_repository_is_created_with_scanning_immutability_and_lifecycle(aws_env: dict[str, str], ecr) -> None:
    image_for("cpu")  # only where the images are built (the script finds this one cached)
    repository = unique_repository()
    target = f"{ECR_HOST}/{repository}"
    try:
        result = run_script("--no-push", "--repository", repository, "--untagged-days", "7", "cpu",
                            env=aws_env, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]

        [repo] = ecr.describe_repositories(repositoryNames=[repository])["repositories"]
        assert repo["imageScanningConfiguration"] == {"scanOnPush": True}
        assert repo["imageTagMutability"] == "IMMUTABLE_WITH_EXCLUSION"
        assert {f["filter"] for f in repo["imageTagMutabilityExclusionFilters"]} == {"latest-*", "*-dirty-*"}
        policy = json.loads(ecr.get_lifecycle_policy(repositoryName=repository)["lifecyclePolicyText"])
        [rule] = policy["rules"]
        assert rule["selection"] == {"tagStatus": "untagged", "countType": "sinceImagePushed",
                                     "countUnit": "days", "countNumber": 7}
        assert rule["action"] == {"type": "expire"}

        refs = result.stdout.split()
        assert len(refs) == 3
        assert refs[0] == f"{target}:{VERSION}-cpu"
        assert re.fullmatch(rf"{re.escape(target)}:{git_tag_pattern()}-cpu", refs[1])
        assert refs[2] == f"{target}:latest-cpu"
        ids = {docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip() for ref in refs}
        assert len(ids) == 1
        platform = docker("image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", refs[0]).stdout.strip()
        assert platform == "linux/amd64"
        assert "get-login-password" not in result.stderr and "docker push" not in result.stderr
    finally:
        untag(local_refs(repository))


@needs_docker
def test_an_existing_version_tag_is_refused_unless_forced(aws_env: dict[str, str], ecr) -> None:
    repository = unique_repository()
    ecr.create_repository(repositoryName=repository, imageTagMutability="MUTABLE")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2,
                           "digest": "sha256:" + "0" * 64},
                "layers": []}
    ecr.put_image(repositoryName=repository, imageManifest=json.dumps(manifest), imageTag=f"{VERSION}-cpu")

    refused = run_script("--no-push", "--repository", repository, "cpu", env=aws_env)
    assert refused.returncode == 1
    assert f"tag(s) already in {repository}: {VERSION}-cpu" in refused.stderr
    assert "build-image.sh" not in refused.stderr  # refused before building anything

    forced = run_script("--dry-run", "--force", "--repository", repository, "cpu", env=aws_env)
    assert forced.returncode == 0, forced.stderr
    assert "overwriting because of --force" in forced.stderr
    # An existing repository is used as it is: no creation, no new policy.
    assert "create-repository" not in forced.stderr and "put-lifecycle-policy" not in forced.stderr
    [repo] = ecr.describe_repositories(repositoryNames=[repository])["repositories"]
    assert repo["imageTagMutability"] == "MUTABLE"


@needs_docker
def test_an_existing_immutable_repository_gets_a_warning_about_latest(aws_env: dict[str, str], ecr) -> None:
    repository = unique_repository()
    ecr.create_repository(repositoryName=repository, imageTagMutability="IMMUTABLE")
    result = run_script("--dry-run", "--repository", repository, "cpu", env=aws_env)
    assert result.returncode == 0, result.stderr
    assert "IMMUTABLE without exclusions" in result.stderr
    assert "put-image-tag-mutability" in result.stderr


# ---- a real registry ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registry() -> Iterator[str]:
    """Debian's docker-registry (the CNCF distribution server) on a free 127.0.0.1 port."""
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if not binary:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    storage = Path(tempfile.mkdtemp(prefix="registry-"))  # removed below: it grows to gigabytes
    port = free_port()
    config = storage / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {storage / 'data'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    process = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v2/", 30, process)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(storage, ignore_errors=True)


@pytest.mark.container
@needs_docker
def test_both_variants_push_to_a_registry_pull_back_and_serve(registry: str) -> None:
    # Only where the images are built (the script then finds them cached).
    image_for("cpu")
    image_for("gpu")
    target = f"{registry}/sagemaker-classifier"
    api = f"http://{registry}/v2/sagemaker-classifier"
    try:
        started = time.monotonic()
        result = run_script("--registry", registry, "both", env=base_env(), timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        print(f"build_and_push.sh --registry {registry} both: {time.monotonic() - started:.1f} s")

        refs = result.stdout.split()
        sha_tag = re.fullmatch(rf"{re.escape(target)}:({git_tag_pattern()})-cpu", refs[1]).group(1)
        tags = {f"{prefix}-{variant}" for prefix in (VERSION, sha_tag, "latest") for variant in ("cpu", "gpu")}
        assert refs == [f"{target}:{tag}" for tag in (f"{VERSION}-cpu", f"{sha_tag}-cpu", "latest-cpu",
                                                      f"{VERSION}-gpu", f"{sha_tag}-gpu", "latest-gpu")]
        assert set(httpx.get(f"{api}/tags/list", timeout=10).json()["tags"]) == tags

        # The registry holds the whole image: its config is the local image, every layer is there.
        image_ids = {}
        for variant in ("cpu", "gpu"):
            local_id = docker("image", "inspect", "--format", "{{.Id}}", f"{target}:{VERSION}-{variant}").stdout.strip()
            for tag in (f"{VERSION}-{variant}", f"{sha_tag}-{variant}", f"latest-{variant}"):
                response = httpx.get(f"{api}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES}, timeout=10)
                assert response.status_code == 200, response.text
                manifest = response.json()
                assert manifest["config"]["digest"] == local_id
                for layer in manifest["layers"]:
                    head = httpx.head(f"{api}/blobs/{layer['digest']}", timeout=10)
                    assert head.status_code == 200 and int(head.headers["content-length"]) == layer["size"]
            image_ids[variant] = local_id
        assert image_ids["cpu"] != image_ids["gpu"]

        # Drop the local registry tags of the CPU image, pull it back by name and serve it. The
        # layers stay in the local store (other tests use the same image), so the pull fetches the
        # manifest and config and checks them; the blob checks above cover the layers.
        cpu_refs = [ref for ref in refs if ref.endswith("-cpu")]
        untag(cpu_refs)
        assert docker("image", "inspect", cpu_refs[0], check=False).returncode != 0
        docker("pull", cpu_refs[0], timeout=600)
        assert docker("image", "inspect", "--format", "{{.Id}}", cpu_refs[0]).stdout.strip() == image_ids["cpu"]
        with serving(cpu_refs[0]) as served:
            assert httpx.get(f"{served.url}/ping", timeout=5).status_code == 200
            png = encode(render("circle", random.Random(0)))
            response = httpx.post(f"{served.url}/invocations", content=png,
                                  headers={"Content-Type": "image/png"}, timeout=60)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("application/json")
            predictions = response.json()["predictions"]
            assert predictions and {"label", "index", "probability"} <= set(predictions[0])
    finally:
        untag(local_refs(f"{registry}/"))
