"""Labelled data as users have it: CSV and JSON Lines manifests, Ground Truth's augmented
manifests and SageMaker's ManifestFiles, each training to the same bar as the ImageFolder test on the same generated images,
and every way a manifest can be wrong named before training starts."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from classifier import artifact
from train.__main__ import main
from train.errors import DataError
from train.sources import find_manifest, read_manifest, resolve

from imagedata import CLASSES, write_shape_splits

BUCKET = "labelled"
LEARN = ["--epochs", "5", "--image-size", "64", "--batch-size", "16", "--learning-rate", "0.01"]
IN_PROCESS = [*LEARN, "--workers", "0"]  # no loader processes: quicker for a run this small
SPLIT_FOLDERS = {"training": "train", "validation": "valid", "test": "test"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shape_splits(tmp_path_factory.mktemp("data"))


def images(dataset: Path) -> Iterator[tuple[str, str, Path]]:
    """(split, class, file) for every image, in a stable order."""
    for split, folder in SPLIT_FOLDERS.items():
        for class_name in sorted(CLASSES):
            for path in sorted((dataset / folder / class_name).iterdir()):
                yield split, class_name, path


def flat_copy(dataset: Path, channel: Path) -> list[tuple[str, str, str]]:
    """Copy every image into ``channel/images/`` under a name that says nothing of its class:
    (split, class, path relative to the channel)."""
    (channel / "images").mkdir(parents=True)
    rows = []
    for number, (split, class_name, path) in enumerate(images(dataset)):
        relative = f"images/{number:04d}.png"
        shutil.copy(path, channel / relative)
        rows.append((split, class_name, relative))
    return rows


def ground_truth_line(uri: str, class_name: str, number: int) -> str:
    """One line as a Ground Truth image-classification labelling job writes it."""
    return json.dumps({
        "source-ref": uri,
        "breed": sorted(CLASSES).index(class_name),
        "breed-metadata": {
            "class-name": class_name, "job-name": "labeling-job/breed", "confidence": 0.93,
            "type": "groundtruth/image-classification", "human-annotated": "yes",
            "creation-date": f"2026-11-0{1 + number % 9}T10:00:{number % 60:02d}.000000",
        },
    })


def learned(base: Path) -> None:
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.8  # the ImageFolder test's bar (chance is 0.33)
    manifest = artifact.load_manifest(base / "model")
    assert manifest.class_names == tuple(sorted(CLASSES))  # the same whatever the source


def test_a_csv_manifest_with_a_split_column_trains_all_three_splits(tmp_path: Path, dataset: Path) -> None:
    channel = tmp_path / "channel"
    rows = flat_copy(dataset, channel)
    with (channel / "labels.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "split"])
        writer.writerows([relative, class_name, split] for split, class_name, relative in rows)
    assert main(["--train", str(channel), "--base-dir", str(tmp_path / "ml"), *IN_PROCESS], {}) == 0
    learned(tmp_path / "ml")


def test_json_lines_manifests_in_separate_channels(tmp_path: Path, dataset: Path) -> None:
    base = tmp_path / "ml"
    for split, class_name, path in images(dataset):
        channel = base / "input" / "data" / split
        (channel / "pictures").mkdir(parents=True, exist_ok=True)
        relative = f"pictures/{class_name}-{path.stem}.png"
        shutil.copy(path, channel / relative)
        with (channel / "train.jsonl").open("a") as file:
            file.write(json.dumps({"image": relative, "class": class_name}) + "\n")
    assert main(["--base-dir", str(base), *IN_PROCESS], {}) == 0
    learned(base)


@pytest.fixture
def s3(mocked_aws: None) -> Any:
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


def test_a_ground_truth_manifest_naming_images_in_s3_downloads_them(tmp_path: Path, dataset: Path, s3) -> None:
    """The channel holds only Ground Truth's output.manifest per split; the images are in S3."""
    base = tmp_path / "ml"
    for number, (split, class_name, path) in enumerate(images(dataset)):
        key = f"raw/photos/{number:04d}.png"
        s3.upload_file(str(path), BUCKET, key)
        channel = base / "input" / "data" / split
        channel.mkdir(parents=True, exist_ok=True)
        with (channel / "output.manifest").open("a") as file:
            file.write(ground_truth_line(f"s3://{BUCKET}/{key}", class_name, number) + "\n")
    assert main(["--base-dir", str(base), *IN_PROCESS], {}) == 0
    learned(base)
    assert len(list((base / "input" / "s3-images" / BUCKET / "raw" / "photos").iterdir())) == 150


def test_a_ground_truth_manifest_finds_images_synced_beside_it(tmp_path: Path, dataset: Path) -> None:
    """``aws s3 sync`` of the bucket's prefix into the channel: the object keys are the paths."""
    channel = tmp_path / "channel"
    lines = []
    for number, (split, class_name, path) in enumerate(images(dataset)):
        if split != "training":
            continue
        key = f"raw/photos/{number:04d}.png"
        (channel / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, channel / key)
        lines.append(ground_truth_line(f"s3://{BUCKET}/{key}", class_name, number))
    (channel / "output.manifest").write_text("\n".join(lines) + "\n")
    entries = read_manifest(channel / "output.manifest", "jsonl")
    assert {entry.labels for entry in entries} == {(name,) for name in CLASSES} and len(entries) == 90
    assert main(["--train", str(channel), "--base-dir", str(tmp_path / "ml"), "--epochs", "1", "--image-size", "32",
                 "--architecture", "resnet18", "--pretrained", "false", "--workers", "0"], {}) == 0
    assert artifact.load_manifest(tmp_path / "ml" / "model").class_names == tuple(sorted(CLASSES))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "text", "message"), [
    ("a.csv", "path,label\nimages/1.png,\n", "a.csv line 2: no label"),
    ("a.csv", "file,label\n,cat\n", "a.csv line 2: no image"),
    ("a.csv", "path,label,split\nimages/1.png,cat,holdout\n", "a.csv line 2: split 'holdout' is none of"),
    ("a.jsonl", '{"path": "1.png", "label": "cat"}\n[1, 2]\n', "a.jsonl line 2: expected a JSON object"),
    ("a.jsonl", '{"path": "1.png", "label": "cat"}\n{"path": \n', "a.jsonl line 2: not JSON"),
    ("a.manifest", '{"source-ref": "s3://b/1.png", "a-metadata": {"class-name": "x"}, '
                   '"b-metadata": {"class-name": "y"}}\n', "found 2 label attributes with a class-name (a, b)"),
])
def test_a_bad_manifest_line_is_named(tmp_path: Path, name: str, text: str, message: str) -> None:
    manifest = write(tmp_path / name, text)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(manifest, {"csv": "csv"}.get(manifest.suffix[1:], "jsonl"))


def test_the_label_attribute_can_be_named(tmp_path: Path) -> None:
    manifest = write(tmp_path / "output.manifest", json.dumps({
        "source-ref": "s3://b/1.png", "a": 0, "a-metadata": {"class-name": "x"},
        "b": 1, "b-metadata": {"class-name": "y"}}) + "\n")
    [entry] = read_manifest(manifest, "jsonl", label_attribute="b")
    assert (entry.image, entry.labels) == ("s3://b/1.png", ("y",))


def run_failing(tmp_path: Path, channel: Path, *extra: str) -> str:
    base = tmp_path / "ml"
    assert main(["--train", str(channel), "--base-dir", str(base), "--epochs", "1", "--image-size", "32",
                 "--architecture", "resnet18", "--pretrained", "false", "--workers", "0", *extra], {}) != 0
    return (base / "output" / "failure").read_text()


def test_two_manifests_in_one_channel_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "c" / "a.csv", "path,label\n1.png,x\n")
    write(tmp_path / "c" / "b.jsonl", '{"path": "1.png", "label": "x"}\n')
    assert "holds several manifests (a.csv, b.jsonl): keep one per channel" in run_failing(tmp_path, tmp_path / "c")


def test_missing_and_unreadable_files_are_skipped_and_listed(tmp_path: Path, dataset: Path) -> None:
    channel = tmp_path / "channel"
    rows = flat_copy(dataset, channel)
    (channel / rows[0][2]).write_bytes(b"not an image")
    lines = ["path,label,split"] + [f"{relative},{class_name},{split}" for split, class_name, relative in rows]
    lines.append("images/missing.png,circle,training")
    write(channel / "labels.csv", "\n".join(lines) + "\n")
    base = tmp_path / "ml"
    assert main(["--train", str(channel), "--base-dir", str(base), "--epochs", "1", "--image-size", "32",
                 "--architecture", "resnet18", "--pretrained", "false", "--workers", "0"], {}) == 0
    skipped = (base / "output" / "data" / "skipped_files.txt").read_text().split()
    assert sorted(Path(path).name for path in skipped) == sorted(["missing.png", Path(rows[0][2]).name])


def test_classes_missing_from_a_split_are_named(tmp_path: Path, dataset: Path) -> None:
    channel = tmp_path / "channel"
    rows = flat_copy(dataset, channel)
    lines = ["path,label,split"] + [f"{relative},{class_name},{split}" for split, class_name, relative in rows
                                    if not (split == "validation" and class_name == "triangle")]
    write(channel / "labels.csv", "\n".join(lines) + "\n")
    assert "missing from validation: ['triangle']" in run_failing(tmp_path, channel)


def test_a_manifest_split_and_a_channel_for_the_same_split_are_refused(tmp_path: Path, dataset: Path) -> None:
    channel = tmp_path / "channel"
    rows = flat_copy(dataset, channel)
    write(channel / "labels.csv", "path,label,split\n" + "".join(
        f"{relative},{class_name},{split}\n" for split, class_name, relative in rows))
    message = run_failing(tmp_path, channel, "--validation", str(dataset / "valid"))
    assert "validation images come both from a manifest's split column and from the validation channel" in message


def test_data_format_folder_ignores_a_manifest(tmp_path: Path, dataset: Path) -> None:
    channel = tmp_path / "channel"
    shutil.copytree(dataset / "train", channel)
    write(channel / "notes.csv", "path,label\nnothing.png,x\n")
    base = tmp_path / "ml"
    assert main(["--train", str(channel), "--base-dir", str(base), "--data-format", "folder", "--epochs", "1",
                 "--image-size", "32", "--architecture", "resnet18", "--pretrained", "false", "--workers", "0"],
                {}) == 0
    assert artifact.load_manifest(base / "model").class_names == tuple(sorted(CLASSES))


@pytest.mark.container
def test_the_image_trains_from_a_ground_truth_manifest_with_flags_only(tmp_path: Path, dataset: Path) -> None:
    """``docker run IMAGE train --train /data`` on a channel holding Ground Truth's manifest and
    the images synced beside it, with the loader's default worker processes."""
    from containers import docker, image_for

    channel = tmp_path / "channel"
    lines = []
    for number, (split, class_name, path) in enumerate(images(dataset)):
        key = f"raw/photos/{number:04d}.png"
        (channel / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, channel / key)
        record = json.loads(ground_truth_line(f"s3://{BUCKET}/{key}", class_name, number))
        lines.append(json.dumps({**record, "split": split}))
    (channel / "output.manifest").write_text("\n".join(lines) + "\n")
    base = tmp_path / "ml"
    base.mkdir()
    run = docker("run", "--rm", "-v", f"{channel}:/data:ro", "-v", f"{base}:/opt/ml", image_for("cpu"),
                 "train", "--train", "/data", *LEARN, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "output.manifest (jsonl)" in run.stderr
    learned(base)


def test_a_manifest_beside_train_and_test_folders_decides_the_splits(tmp_path: Path, dataset: Path) -> None:
    """``labels.csv`` next to ``train/`` and ``test/`` names its files there: the folders are not
    read as the splits of an ImageFolder dataset."""
    channel = tmp_path / "channel"
    lines = ["path,label,split"]
    for number, (split, class_name, path) in enumerate(images(dataset)):
        relative = f"{SPLIT_FOLDERS[split]}/{number:04d}.png"  # flat: no class folders
        (channel / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, channel / relative)
        lines.append(f"{relative},{class_name},{split}")
    write(channel / "labels.csv", "\n".join(lines) + "\n")
    base = tmp_path / "ml"
    assert main(["--train", str(channel), "--base-dir", str(base), "--epochs", "1", "--image-size", "32",
                 "--architecture", "resnet18", "--pretrained", "false", "--workers", "0"], {}) == 0
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    assert "test" in metrics and artifact.load_manifest(base / "model").class_names == tuple(sorted(CLASSES))


def test_a_csv_beside_train_and_valid_folders_that_is_no_manifest_is_left_alone(tmp_path: Path, dataset: Path) -> None:
    """A Kaggle-style download: ``train/ valid/`` and a submission template. With ``auto`` and with
    ``data_format=folder`` alike, the folders are the splits."""
    channel = tmp_path / "channel"
    shutil.copytree(dataset / "train", channel / "train")
    shutil.copytree(dataset / "valid", channel / "valid")
    write(channel / "sample_submission.csv", "id,prediction\n1,circle\n")
    for data_format in ("auto", "folder"):
        base = tmp_path / data_format
        assert main(["--train", str(channel), "--base-dir", str(base), "--data-format", data_format, "--epochs", "1",
                     "--image-size", "32", "--architecture", "resnet18", "--pretrained", "false", "--workers", "0"],
                    {}) == 0
        assert artifact.load_manifest(base / "model").class_names == tuple(sorted(CLASSES))


def test_s3_images_are_found_under_a_channel_that_holds_their_prefix(tmp_path: Path, dataset: Path) -> None:
    """The channel is ``s3://bucket/dataset/``: ``s3://bucket/dataset/images/7.png`` is
    ``images/7.png`` in it. Nothing is downloaded (no S3 here: a download would fail the run)."""
    channel = tmp_path / "channel"
    lines = []
    for number, (split, class_name, path) in enumerate(images(dataset)):
        if split != "training":
            continue
        (channel / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, channel / "images" / f"{number}.png")
        lines.append(ground_truth_line(f"s3://{BUCKET}/dataset/images/{number}.png", class_name, number))
    write(channel / "output.manifest", "\n".join(lines) + "\n")
    base = tmp_path / "ml"
    assert main(["--train", str(channel), "--base-dir", str(base), "--epochs", "1", "--image-size", "32",
                 "--architecture", "resnet18", "--pretrained", "false", "--workers", "0"], {}) == 0
    assert not (base / "input" / "s3-images").exists() or not any((base / "input" / "s3-images").rglob("*.png"))


def test_a_download_that_is_refused_stops_training_with_the_reason(tmp_path: Path, s3) -> None:
    channel = tmp_path / "channel"
    write(channel / "output.manifest", ground_truth_line("s3://no-such-bucket/photos/1.png", "circle", 1) + "\n"
          + ground_truth_line("s3://no-such-bucket/photos/2.png", "square", 2) + "\n")
    message = run_failing(tmp_path, channel)
    assert "cannot download s3://no-such-bucket/photos/" in message and "NoSuchBucket" in message


def test_ground_truth_records_it_could_not_label_are_left_out(tmp_path: Path) -> None:
    labelled = json.loads(ground_truth_line("s3://b/photos/1.png", "circle", 1))
    failed = {"source-ref": "s3://b/photos/2.png",
              "breed-metadata": {"failure-reason": "ClientError: annotation timed out", "job-name": "labeling-job/breed",
                                 "type": "groundtruth/image-classification", "human-annotated": "yes"}}
    manifest = write(tmp_path / "output.manifest", json.dumps(failed) + "\n" + json.dumps(labelled) + "\n")
    [entry] = read_manifest(manifest, "jsonl")
    assert (entry.image, entry.labels, entry.line) == ("s3://b/photos/1.png", ("circle",), 2)


def test_the_built_in_algorithms_augmented_manifest_reads_its_class_attribute(tmp_path: Path) -> None:
    manifest = write(tmp_path / "train.manifest", '{"source-ref": "s3://b/1.jpg", "class": "3"}\n'
                                                  '{"source-ref": "s3://b/2.jpg", "class": 1}\n')
    assert [(entry.image, entry.labels) for entry in read_manifest(manifest, "jsonl")] == [
        ("s3://b/1.jpg", ("3",)), ("s3://b/2.jpg", ("1",))]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("a.csv", "id,prediction\n1,x\n", "header (id, prediction) needs an image column"),
    ("a.csv", 'path,label\n\n"images/1\n.png",cat\n\nimages/2.png,\n', "a.csv line 6: no label"),
    ("a.jsonl", '{"path": "1.png", "label": ["a", "b"]}\n', 'a label is a name or a number, not ["a", "b"]'),
    ("a.manifest", '{"source-ref": "s3://b/../x.png", "l-metadata": {"class-name": "x"}}\n', None),
])
def test_more_bad_manifests_are_named(tmp_path: Path, name: str, text: str, message: str | None) -> None:
    manifest = write(tmp_path / name, text)
    if message is None:  # read fine; the key that climbs out of its folder is refused when it is looked for
        [entry] = read_manifest(manifest, "jsonl")
        with pytest.raises(DataError, match="does not name an S3 object"):
            resolve(tmp_path, [entry], download_dir=tmp_path / "d")
        return
    with pytest.raises(DataError, match=re.escape(message)):
        read_manifest(manifest, "csv" if name.endswith(".csv") else "jsonl")


def manifest_file(prefix: str, keys: list[str]) -> str:
    """A ManifestFile as SageMaker's S3DataType=ManifestFile channels read it."""
    return json.dumps([{"prefix": prefix}, *keys])


def test_a_manifest_file_of_objects_in_s3_trains_every_split_from_its_keys(tmp_path: Path, dataset: Path, s3) -> None:
    """The channel holds only the ManifestFile; its keys are <split>/<class>/<image> below the prefix."""
    keys = []
    for split, class_name, path in images(dataset):
        key = f"{SPLIT_FOLDERS[split]}/{class_name}/{path.name}"
        s3.upload_file(str(path), BUCKET, f"shapes/{key}")
        keys.append(key)
    s3.upload_file(str(path), BUCKET, "shapes/unlisted/extra.png")  # not in the manifest: not downloaded
    channel = tmp_path / "channel"
    write(channel / "train.manifest", manifest_file(f"s3://{BUCKET}/shapes/", keys))
    base = tmp_path / "ml"
    assert main(["--train", str(channel), "--base-dir", str(base), *IN_PROCESS], {}) == 0
    learned(base)
    downloaded = sorted(path.relative_to(base / "input" / "s3-images" / BUCKET / "shapes").as_posix()
                        for path in (base / "input" / "s3-images").rglob("*.png"))
    assert downloaded == sorted(keys)


def test_a_manifest_file_labels_each_image_by_its_folder(tmp_path: Path) -> None:
    manifest = write(tmp_path / "data.json", manifest_file(
        "s3://b/data/", ["beagle/1.jpg", "pug/2.jpg", "valid/pug/3.jpg", "photos/2026/beagle/4.jpg", "test/5.jpg"]))
    assert [(entry.image, entry.labels, entry.split, entry.line) for entry in read_manifest(manifest, "manifest-file")] == [
        ("s3://b/data/beagle/1.jpg", ("beagle",), None, 1),
        ("s3://b/data/pug/2.jpg", ("pug",), None, 2),
        ("s3://b/data/valid/pug/3.jpg", ("pug",), "validation", 3),
        ("s3://b/data/photos/2026/beagle/4.jpg", ("beagle",), None, 4),
        ("s3://b/data/test/5.jpg", ("test",), None, 5),  # a class folder named "test"
    ]


@pytest.mark.parametrize(("text", "message"), [
    ('["beagle/1.jpg"]', 'a ManifestFile is a JSON list that starts with {"prefix"'),
    ('{"prefix": "s3://b/"}', 'a ManifestFile is a JSON list that starts with {"prefix"'),
    ('[{"prefix": "data/"}, "beagle/1.jpg"]', 'a ManifestFile is a JSON list that starts with {"prefix"'),
    ('[{"prefix": "s3://b/"}, "beagle/1.jpg", "2.jpg"]', "m.json item 2: '2.jpg' is in no class folder"),
    ('[{"prefix": "s3://b/"}, "beagle/1.jpg", {"key": "x"}]', 'm.json item 2: expected an object key, not {"key": "x"}'),
    ('[{"prefix": "s3://b/"}]', "lists no images"),
    ('[{"prefix": "s3://b/"}, ', "m.json: not JSON"),
])
def test_a_bad_manifest_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        read_manifest(write(tmp_path / "m.json", text), "manifest-file")


def test_a_manifest_file_is_told_from_other_json_beside_it(tmp_path: Path) -> None:
    channel = tmp_path / "channel"
    write(channel / "classes.json", '["beagle", "pug"]')
    write(channel / "beagle" / "1.jpg", "")
    assert find_manifest(channel, "auto") is None  # an ImageFolder with a JSON file beside it
    assert find_manifest(channel, "folder") is None
    write(channel / "data.manifest", manifest_file("s3://b/", ["beagle/1.jpg"]))
    assert find_manifest(channel, "auto") == (channel / "data.manifest", "manifest-file")
    assert find_manifest(channel, "manifest-file") == (channel / "data.manifest", "manifest-file")
    (channel / "data.manifest").unlink()
    write(channel / "train.manifest", '{"source-ref": "s3://b/1.jpg", "class": "3"}\n')
    assert find_manifest(channel, "auto") == (channel / "train.manifest", "jsonl")
