"""deploy/cloudformation.yaml: it lints clean and its IAM stays least-privilege.

The policy checks are plain functions over the parsed template, each proven able to fail on a
deliberately bad synthetic document, so a wildcard or a *FullAccess policy added later breaks
the suite instead of slipping through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "deploy" / "cloudformation.yaml"

# Actions that AWS does not let a policy scope to a resource: for these alone "Resource": "*"
# is unavoidable (and documented in docs/security.md).
UNSCOPABLE_ACTIONS = frozenset({"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData"})

# S3 actions that change objects; the execution role may do these under the output prefix only.
S3_WRITE_ACTIONS = frozenset({"s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject", "s3:PutObjectAcl"})


# ---------------------------------------------------------------- loading the template


class _CloudFormationLoader(yaml.SafeLoader):
    """A safe YAML loader that understands CloudFormation's short-form intrinsics."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    else:
        raise yaml.constructor.ConstructorError(None, None, f"unexpected node for !{suffix}", node.start_mark)
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)  # !GetAtt Res.Attr is Fn::GetAtt [Res, Attr]
    key = suffix if suffix in ("Ref", "Condition") else f"Fn::{suffix}"
    return {key: value}


_CloudFormationLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_CloudFormationLoader)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


# ---------------------------------------------------------------- walking policies


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _leaves(value: Any) -> Iterator[Any]:
    """Strings of a policy field; Fn::If contributes both branches, Fn::Sub its template."""
    if isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict) and "Fn::If" in value:
        for branch in value["Fn::If"][1:]:
            yield from _leaves(branch)
    elif isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        yield sub[0] if isinstance(sub, list) else sub
    elif isinstance(value, dict) and value == {"Ref": "AWS::NoValue"}:
        return
    else:
        yield value


def statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The statements of one policy document, both branches of any Fn::If included."""
    return [s for s in _leaves(document.get("Statement", [])) if isinstance(s, dict)]


def policy_documents(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every mapping with a "Statement" under node: inline, managed, bucket, repository policies."""
    if isinstance(node, dict):
        if "Statement" in node:
            yield where, node
        for key, value in node.items():
            yield from policy_documents(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from policy_documents(value, f"{where}[{index}]")


def _strings(value: Any) -> list[str]:
    return [leaf for leaf in _leaves(value) if isinstance(leaf, str)]


def wildcard_grants(document: dict[str, Any]) -> list[str]:
    """Allow statements that grant a wildcard action on every resource, or use NotAction/NotResource.

    A wildcard action is "*" or any pattern with "*" in it ("s3:*", "s3:Get*"); every resource
    is "Resource": "*". NotAction and NotResource in an Allow grant "everything but" and are
    refused outright.
    """
    findings = []
    for statement in statements(document):
        if statement.get("Effect") != "Allow":
            continue
        label = statement.get("Sid", json.dumps(statement, default=str)[:80])
        if "NotAction" in statement or "NotResource" in statement:
            findings.append(f"{label}: Allow with NotAction/NotResource")
            continue
        actions = _strings(statement.get("Action", []))
        resources = _strings(statement.get("Resource", []))
        wild_actions = [a for a in actions if "*" in a]
        if wild_actions and "*" in resources:
            findings.append(f"{label}: {wild_actions} on Resource '*'")
    return findings


def full_access_policies(template: dict[str, Any]) -> list[str]:
    """Managed policy ARNs attached anywhere in the template whose name ends in FullAccess."""
    found = []
    for name, resource in template.get("Resources", {}).items():
        for arn in _strings(resource.get("Properties", {}).get("ManagedPolicyArns", [])):
            if arn.rstrip("/").endswith("FullAccess"):
                found.append(f"{name}: {arn}")
    return found


def role_statements(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """The Allow statements of a role's inline policies."""
    policies = template["Resources"][role]["Properties"].get("Policies", [])
    return [s for p in policies for s in statements(p["PolicyDocument"]) if s["Effect"] == "Allow"]


def grants(statements_: list[dict[str, Any]], action: str) -> list[str]:
    """The resources (as written, Fn::Sub templates included) on which action is allowed."""
    return [r for s in statements_ if action in _strings(s["Action"]) for r in _strings(s["Resource"])]


# ---------------------------------------------------------------- the checkers can fail


def test_wildcard_checker_flags_bad_documents() -> None:
    bad = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Admin", "Effect": "Allow", "Action": "*", "Resource": "*"},
            {"Sid": "AllS3", "Effect": "Allow", "Action": ["s3:*"], "Resource": ["*"]},
            {"Sid": "AllReads", "Effect": "Allow", "Action": "s3:Get*", "Resource": "*"},
            {"Sid": "Inverted", "Effect": "Allow", "NotAction": "iam:*", "Resource": "*"},
            {
                "Fn::If": [
                    "SomeCondition",
                    {"Sid": "Hidden", "Effect": "Allow", "Action": "ecr:*", "Resource": "*"},
                    {"Ref": "AWS::NoValue"},
                ]
            },
        ],
    }
    findings = wildcard_grants(bad)
    assert [f.split(":")[0] for f in findings] == ["Admin", "AllS3", "AllReads", "Inverted", "Hidden"]


def test_wildcard_checker_passes_scoped_and_deny_statements() -> None:
    good = {
        "Statement": [
            {"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
            {"Effect": "Allow", "Action": "s3:*", "Resource": {"Fn::Sub": "${Bucket.Arn}/data/*"}},
            {"Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*"},
        ]
    }
    assert wildcard_grants(good) == []


def test_full_access_checker_flags_attached_full_access_policies() -> None:
    bad = {
        "Resources": {
            "Role": {
                "Type": "AWS::IAM::Role",
                "Properties": {
                    "ManagedPolicyArns": [
                        {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/AmazonSageMakerFullAccess"},
                        "arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess",
                    ]
                },
            }
        }
    }
    assert full_access_policies(bad) == ["Role: arn:${AWS::Partition}:iam::aws:policy/AmazonSageMakerFullAccess"]


def test_loader_maps_short_form_intrinsics() -> None:
    text = "A: !Sub x-${B}\nC: !GetAtt R.Arn\nD: !If [Cond, [!Ref E], !Ref AWS::NoValue]\n"
    assert yaml.load(text, Loader=_CloudFormationLoader) == {
        "A": {"Fn::Sub": "x-${B}"},
        "C": {"Fn::GetAtt": ["R", "Arn"]},
        "D": {"Fn::If": ["Cond", [{"Ref": "E"}], {"Ref": "AWS::NoValue"}]},
    }


# ---------------------------------------------------------------- the template


def test_template_passes_cfn_lint() -> None:
    from cfnlint.api import ManualArgs, lint_file

    # Informational checks included; the partitions the ARNs are built for included.
    config = ManualArgs(regions=["us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1"], include_checks=["I"])
    matches = lint_file(TEMPLATE_PATH, config=config)
    assert [str(m) for m in matches] == []


def test_no_policy_allows_wildcard_actions_on_all_resources(template: dict[str, Any]) -> None:
    documents = list(policy_documents(template["Resources"]))
    # Two trust policies, six permission documents (three inline on the execution role, one on
    # the Lambda role, the bucket policy, the CI policy): a walker that found nothing proves nothing.
    assert len(documents) >= 8, [where for where, _ in documents]
    findings = [f"{where}: {f}" for where, doc in documents for f in wildcard_grants(doc)]
    assert findings == []


def test_only_unscopable_actions_use_resource_star(template: dict[str, Any]) -> None:
    offenders = [
        (where, statement.get("Sid"), action)
        for where, document in policy_documents(template["Resources"])
        for statement in statements(document)
        if statement["Effect"] == "Allow" and "*" in _strings(statement.get("Resource", []))
        for action in _strings(statement["Action"])
        if action not in UNSCOPABLE_ACTIONS
    ]
    assert offenders == []


def test_metrics_limited_to_sagemaker_namespaces(template: dict[str, Any]) -> None:
    [statement] = [
        s
        for s in role_statements(template, "SageMakerExecutionRole")
        if "cloudwatch:PutMetricData" in _strings(s["Action"])
    ]
    assert statement["Condition"] == {"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}}


def test_no_full_access_managed_policies(template: dict[str, Any]) -> None:
    assert full_access_policies(template) == []


def test_bucket_is_encrypted_private_and_tls_only(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    bucket = resources["Bucket"]["Properties"]
    [rule] = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms", "aws:kms:dsse")
    block = bucket["PublicAccessBlockConfiguration"]
    assert set(block) == {"BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"}
    assert all(value is True for value in block.values())
    assert bucket["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]

    policy = resources["BucketPolicy"]["Properties"]
    assert policy["Bucket"] == {"Ref": "Bucket"}
    tls_denies = [
        s
        for s in statements(policy["PolicyDocument"])
        if s["Effect"] == "Deny"
        and s["Principal"] == "*"
        and "s3:*" in _strings(s["Action"])
        and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
    ]
    assert len(tls_denies) == 1
    # Both the bucket (ListBucket) and its objects.
    assert _strings(tls_denies[0]["Resource"]) == ["${Bucket.Arn}/*"]
    assert {"Fn::GetAtt": ["Bucket", "Arn"]} in tls_denies[0]["Resource"]


def test_lambda_role_invokes_exactly_one_endpoint(template: dict[str, Any]) -> None:
    allowed = role_statements(template, "LambdaRole")
    sagemaker_actions = {a for s in allowed for a in _strings(s["Action"]) if a.startswith("sagemaker:")}
    assert sagemaker_actions == {"sagemaker:InvokeEndpoint"}
    assert grants(allowed, "sagemaker:InvokeEndpoint") == [
        "arn:${AWS::Partition}:sagemaker:${AWS::Region}:${AWS::AccountId}:endpoint/${EndpointName}"
    ]
    # Besides that: its own log group, and (only when S3 references are switched on) the data prefix.
    services = {a.split(":")[0] for s in allowed for a in _strings(s["Action"])}
    assert services <= {"sagemaker", "logs", "s3"}
    log_resources = [s["Resource"] for s in allowed if any(a.startswith("logs:") for a in _strings(s["Action"]))]
    assert log_resources == [{"Fn::GetAtt": ["LambdaLogGroup", "Arn"]}]
    assert {a for s in allowed for a in _strings(s["Action"]) if a.startswith("s3:")} <= {"s3:GetObject"}
    assert grants(allowed, "s3:GetObject") in ([], ["${Bucket.Arn}/${DataPrefix}*"])


def test_lambda_reads_s3_only_when_switched_on(template: dict[str, Any]) -> None:
    [policy] = template["Resources"]["LambdaRole"]["Properties"]["Policies"]
    unconditional = [s for s in policy["PolicyDocument"]["Statement"] if "Fn::If" not in s]
    assert not any(a.startswith("s3:") for s in unconditional for a in _strings(s["Action"]))
    conditional = [s["Fn::If"] for s in policy["PolicyDocument"]["Statement"] if "Fn::If" in s]
    assert [(c[0], c[2]) for c in conditional] == [("LambdaReadsS3", {"Ref": "AWS::NoValue"})]
    assert template["Parameters"]["LambdaS3References"]["Default"] == "false"


def test_endpoint_name_must_be_lower_case_like_its_arn(template: dict[str, Any]) -> None:
    pattern = re.compile(template["Parameters"]["EndpointName"]["AllowedPattern"])
    assert pattern.fullmatch(template["Parameters"]["EndpointName"]["Default"])
    assert pattern.fullmatch("my-endpoint-2")
    assert not pattern.fullmatch("MyEndpoint")
    assert not pattern.fullmatch("endpoint/*")


def test_execution_role_reads_data_prefix_and_writes_output_prefix(template: dict[str, Any]) -> None:
    allowed = role_statements(template, "SageMakerExecutionRole")
    s3_actions = {a for s in allowed for a in _strings(s["Action"]) if a.startswith("s3:")}
    assert s3_actions == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"}

    # Reads: the data prefix, and the output prefix (model.tar.gz for hosting, checkpoints).
    assert sorted(grants(allowed, "s3:GetObject")) == ["${Bucket.Arn}/${DataPrefix}*", "${Bucket.Arn}/${OutputPrefix}*"]
    # Writes: the output prefix only, never the data.
    for action in s3_actions & S3_WRITE_ACTIONS:
        assert grants(allowed, action) == ["${Bucket.Arn}/${OutputPrefix}*"], action
    # Listing: the bucket, and only under the two prefixes.
    [listing] = [s for s in allowed if "s3:ListBucket" in _strings(s["Action"])]
    assert listing["Resource"] == {"Fn::GetAtt": ["Bucket", "Arn"]}
    assert _strings(listing["Condition"]["StringLike"]["s3:prefix"]) == ["${DataPrefix}*", "${OutputPrefix}*"]


def test_execution_role_pulls_only_its_own_repository(template: dict[str, Any]) -> None:
    allowed = role_statements(template, "SageMakerExecutionRole")
    ecr_actions = {a for s in allowed for a in _strings(s["Action"]) if a.startswith("ecr:")}
    assert ecr_actions == {
        "ecr:GetAuthorizationToken",
        "ecr:BatchCheckLayerAvailability",
        "ecr:GetDownloadUrlForLayer",
        "ecr:BatchGetImage",
    }
    repository_arn = {"Fn::GetAtt": ["Repository", "Arn"]}
    for action in ecr_actions - {"ecr:GetAuthorizationToken"}:
        assert [s["Resource"] for s in allowed if action in _strings(s["Action"])] == [repository_arn], action
    trust = template["Resources"]["SageMakerExecutionRole"]["Properties"]["AssumeRolePolicyDocument"]
    assert [s["Principal"] for s in statements(trust)] == [{"Service": "sagemaker.amazonaws.com"}]


def test_ci_policy_pushes_to_its_own_repository_only(template: dict[str, Any]) -> None:
    policy = template["Resources"]["CiPushPolicy"]
    assert policy["Type"] == "AWS::IAM::ManagedPolicy"
    allowed = [s for s in statements(policy["Properties"]["PolicyDocument"]) if s["Effect"] == "Allow"]
    assert "ecr:PutImage" in {a for s in allowed for a in _strings(s["Action"])}
    for statement in allowed:
        if statement["Resource"] != "*":
            assert statement["Resource"] == {"Fn::GetAtt": ["Repository", "Arn"]}
    assert not any(a.startswith(("iam:", "s3:", "sagemaker:")) for s in allowed for a in _strings(s["Action"]))


def test_repository_scans_keeps_content_tags_and_expires_untagged(template: dict[str, Any]) -> None:
    repository = template["Resources"]["Repository"]["Properties"]
    assert repository["ImageScanningConfiguration"] == {"ScanOnPush": True}
    assert repository["ImageTagMutability"] == "IMMUTABLE_WITH_EXCLUSION"
    exclusions = [f["ImageTagMutabilityExclusionFilterValue"] for f in repository["ImageTagMutabilityExclusionFilters"]]
    assert exclusions == ["latest-*", "*-dirty-*"]  # the tags build_and_push.sh moves
    assert repository["EncryptionConfiguration"]["EncryptionType"] in ("AES256", "KMS")
    rules = json.loads(repository["LifecyclePolicy"]["LifecyclePolicyText"])["rules"]
    assert [(r["selection"]["tagStatus"], r["action"]["type"]) for r in rules] == [("untagged", "expire")]


def test_lambda_runs_the_handler_against_the_endpoint(template: dict[str, Any]) -> None:
    function = template["Resources"]["InvokeFunction"]["Properties"]
    assert (function["Runtime"], function["Handler"]) == ("python3.11", "handler.handler")
    assert function["Environment"]["Variables"] == {
        "ENDPOINT_NAME": {"Ref": "EndpointName"},
        "ALLOWED_ORIGINS": {"Ref": "AllowedOrigins"},
        "ALLOWED_BUCKETS": {"Fn::If": ["LambdaReadsS3", {"Ref": "Bucket"}, ""]},
    }
    assert function["Role"] == {"Fn::GetAtt": ["LambdaRole", "Arn"]}
