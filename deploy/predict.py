"""``classifier-predict``: classify image files against a running server or a SageMaker endpoint.

Examples::

    classifier-predict --url http://127.0.0.1:8080 photos/             # the compose service
    classifier-predict --url http://127.0.0.1:8080 cat.jpg 'shots/**/*.png' --top-k 3
    classifier-predict --url http://127.0.0.1:8080 photos/ --format csv --output predictions.csv
    classifier-predict --endpoint dogs --region eu-west-1 photos/ --format json
    classifier-predict --endpoint shared --target-model dogs.tar.gz photos/   # a multi-model endpoint
    python -m deploy.predict --help

PATHS are files (sent whatever their name), folders (searched recursively for image suffixes) or
globs (quote them to use ``**``). Each image is one request; ``--concurrency`` requests are in
flight at once and the results come out in input order: a table on the terminal, or CSV (one row
per prediction: ``file,rank,label,index,probability``) or JSON (a list of ``{"file",
"predictions"}`` or ``{"file", "error"}``).

A file that cannot be read or that the server refuses is skipped and listed at the end; so is a
path or pattern that names no image. Exit status: 0 when every image was classified, 1 when
something was skipped or the server/endpoint could not be used at all (one message, e.g. no
server listening, no AWS credentials, no such endpoint), 2 for bad usage or no image found.
"""

from __future__ import annotations

import argparse
import csv
import glob
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import quote, urlsplit

import boto3
import httpx
import urllib3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ProfileNotFound,
    ReadTimeoutError,
)
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

PROG = "classifier-predict"
CONTENT_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
    ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
}
GENERIC_IMAGE = "application/x-image"
JSON = "application/json"
FORMATS = ("table", "csv", "json")
PROGRESS_ABOVE = 4  # images; fewer finish before a bar would be worth drawing
# Error codes that mean the credentials themselves are refused: the same for every file.
AUTH_ERRORS = frozenset({"UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException",
                         "AccessDeniedException", "InvalidClientTokenId", "ExpiredToken", "AccessDenied"})


# --- finding images --------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    images: list[Path]
    unmatched: list[str]  # the paths and patterns that named no image


def search(patterns: Iterable[str]) -> Found:
    """Files named directly, image files under folders (recursively), and glob matches, in order.

    Anything that is not a folder counts, so a broken link or an unreadable file is found here and
    reported when it cannot be read, instead of vanishing silently. Inside folders, hidden names
    are passed over as ``*`` passes them over (macOS leaves ``._photo.jpg`` files that are no image).
    """
    found: dict[Path, None] = {}
    unmatched = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in CONTENT_TYPES and not p.is_dir()
                             and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif os.path.lexists(path):
            matches = [path]
        else:
            matches = sorted(Path(match) for match in glob.glob(pattern, recursive=True) if not Path(match).is_dir())
        if not matches:
            unmatched.append(pattern)
        found.update(dict.fromkeys(matches))
    return Found(list(found), unmatched)


def find_images(patterns: Iterable[str]) -> list[Path]:
    """Like :func:`search`, but a path or pattern that names no image raises FileNotFoundError."""
    found = search(patterns)
    if found.unmatched:
        raise FileNotFoundError(f"no image files match {found.unmatched[0]!r}")
    return found.images


def content_type(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), GENERIC_IMAGE)


# --- answers and errors ----------------------------------------------------------------------


@dataclass(frozen=True)
class Ranked:
    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Outcome:
    path: Path
    predictions: tuple[Ranked, ...] = ()
    error: str | None = None


class Fatal(Exception):
    """The server or endpoint cannot be used at all (the same for every file): stop the run."""


class Refused(Exception):
    """This one image could not be classified; the others go on."""


def parse_predictions(body: bytes) -> tuple[Ranked, ...]:
    """Our server's answer for one image: ``{"predictions": [{"label", "index", "probability"}]}``."""
    try:
        return tuple(Ranked(str(p["label"]), int(p["index"]), float(p["probability"]))
                     for p in json.loads(body)["predictions"])
    except (ValueError, TypeError, KeyError) as error:
        raise Refused(f"unexpected answer ({type(error).__name__}): {body[:200]!r}") from None


def describe_error(body: bytes | str, status: int | None) -> str:
    """``code: message`` from our server's JSON error body, else the status and the start of the body."""
    try:
        error = json.loads(body)["error"]
        return f"{error['code']}: {error.get('message', '')}"
    except (ValueError, TypeError, KeyError):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return f"HTTP {status}: {text.strip()[:200] or '(empty body)'}"


class Classifier(Protocol):
    def check(self) -> None: ...
    def classify(self, body: bytes, content_type: str) -> tuple[Ranked, ...]: ...
    def close(self) -> None: ...


# --- a server by URL (docker compose, docker run, a multi-model container) ---------------------


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerClient:
    """``POST /invocations``, or ``POST /models/NAME/invoke`` on a multi-model container."""

    def __init__(self, url: str, *, target_model: str | None, top_k: int | None, timeout_s: float,
                 concurrency: int) -> None:
        self.url = url
        self.target_model = target_model
        self.path = f"/models/{quote(target_model, safe='')}/invoke" if target_model else "/invocations"
        self.headers = {"Accept": JSON}
        if top_k is not None:
            self.headers["X-Amzn-SageMaker-Custom-Attributes"] = f"top_k={top_k}"
        # A proxy from the environment must not swallow requests meant for this machine.
        self.http = httpx.Client(base_url=url, timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10)),
                                 limits=httpx.Limits(max_connections=concurrency), trust_env=not is_loopback(url))

    def unreachable(self, error: Exception) -> Fatal:
        return Fatal(f"cannot reach {self.url} ({str(error) or type(error).__name__}): is the server running? "
                     "(docker compose up)")

    def check(self) -> None:
        """One GET /ping first: a server that is down or still loading is said once, not per file.

        Only 503 stops the run (loading or failed, as our server says); any other answer is left
        to the invocations, so servers without our /ping (or a multi-model one) still work.
        """
        try:
            response = self.http.get("/ping")
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise self.unreachable(error) from None
        except httpx.TransportError:
            return
        if response.status_code != 503 or self.target_model:
            return
        try:
            state = json.loads(response.content)
        except ValueError:
            state = {}
        if state.get("status") == "loading":
            raise Fatal(f"the server at {self.url} is still loading its model (GET /ping: 503); try again shortly")
        reason = state.get("reason") or state.get("status") or response.text[:200]
        raise Fatal(f"the server at {self.url} is not ready (GET /ping: 503): {reason}")

    def classify(self, body: bytes, content_type: str) -> tuple[Ranked, ...]:
        try:
            response = self.http.post(self.path, content=body, headers={**self.headers, "Content-Type": content_type})
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise self.unreachable(error) from None
        except httpx.TimeoutException:
            raise Refused(f"no answer within {self.http.timeout.read:g} s (--timeout)") from None
        except httpx.TransportError as error:
            raise Refused(f"{type(error).__name__}: {error}") from None
        if response.status_code == 404:
            # A wrong URL, or a model the multi-model server has not loaded: every file would say so.
            raise Fatal(f"POST {self.url}{self.path}: 404 {describe_error(response.content, 404)}")
        if response.is_error:
            raise Refused(describe_error(response.content, response.status_code))
        return parse_predictions(response.content)

    def close(self) -> None:
        self.http.close()


# --- a SageMaker endpoint ----------------------------------------------------------------------


def no_credentials(profile: str | None) -> str:
    if profile:
        return f"no AWS credentials found for profile {profile!r} (aws configure --profile {profile}, or aws sso login)"
    return ("no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "pass --profile, or run aws configure)")


def make_runtime_client(profile: str | None, region: str | None, timeout_s: float) -> Any:
    try:
        session = boto3.Session(profile_name=profile, region_name=region)
        return session.client("sagemaker-runtime", config=Config(
            read_timeout=timeout_s, connect_timeout=min(timeout_s, 10), retries={"mode": "standard"}))
    except ProfileNotFound:
        raise Fatal(f"AWS profile {profile!r} not found in the AWS config files") from None
    except NoRegionError:
        raise Fatal("no AWS region: pass --region or set AWS_REGION (or a region in the AWS config)") from None


class EndpointClient:
    """``InvokeEndpoint`` through a ``sagemaker-runtime`` client."""

    def __init__(self, runtime: Any, endpoint: str, *, target_model: str | None, top_k: int | None,
                 profile: str | None) -> None:
        self.runtime = runtime
        self.endpoint = endpoint
        self.region = runtime.meta.region_name if hasattr(runtime, "meta") else "local mode"
        self.profile = profile
        self.arguments = {"EndpointName": endpoint, "Accept": JSON}
        if top_k is not None:
            self.arguments["CustomAttributes"] = f"top_k={top_k}"
        if target_model:
            self.arguments["TargetModel"] = target_model

    def check(self) -> None:
        """Nothing to ask first: sagemaker-runtime has no ping, and the first invocation says it all."""

    def classify(self, body: bytes, content_type: str) -> tuple[Ranked, ...]:
        try:
            response = self.runtime.invoke_endpoint(**self.arguments, ContentType=content_type, Body=body)
            stream = response["Body"]
            try:
                answer = stream.read()
            finally:  # back to the pool (local mode's urllib3 response), or closed (botocore's stream)
                (getattr(stream, "release_conn", None) or stream.close)()
        except urllib3.exceptions.HTTPError as error:  # local mode's runtime speaks HTTP itself
            raise Fatal(f"cannot reach the local endpoint: {error}") from None
        except NoCredentialsError:
            raise Fatal(no_credentials(self.profile)) from None
        except ClientError as error:
            raise self.translate(error) from None
        except EndpointConnectionError as error:
            raise Fatal(f"cannot reach SageMaker Runtime in {self.region}: {error}") from None
        except (ReadTimeoutError, ConnectTimeoutError):
            raise Refused("no answer in time (--timeout)") from None
        except BotoCoreError as error:
            raise Refused(f"{type(error).__name__}: {error}") from None
        # Local mode hands back the server's error as an answer (with its status on the body in SDK v2).
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or getattr(response["Body"], "status", None)
        if isinstance(status, int) and status >= 400:
            raise Refused(describe_error(answer, status))
        return parse_predictions(answer)

    def translate(self, error: ClientError) -> Exception:
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message", "")
        if code == "ModelError":  # the container answered 4xx/5xx: its own error body is the news
            original = error.response.get("OriginalMessage")
            return Refused(describe_error(original, error.response.get("OriginalStatusCode")) if original
                           else f"ModelError: {message}")
        if code == "ValidationError" and message.startswith("Endpoint ") and "not found" in message:
            return Fatal(f"endpoint {self.endpoint} not found in {self.region}")
        if code in AUTH_ERRORS:
            return Fatal(f"AWS refused the credentials: {code}: {message}")
        return Refused(f"{code}: {message}")

    def close(self) -> None:
        pass


# --- classifying -------------------------------------------------------------------------------


def classify_file(client: Classifier, path: Path) -> Outcome:
    try:
        body = path.read_bytes()
    except OSError as error:
        return Outcome(path, error=f"cannot read: {error.strerror or error}")
    try:
        return Outcome(path, client.classify(body, content_type(path)))
    except Refused as error:
        return Outcome(path, error=str(error))


def classify_all(classify: Callable[[Path], Outcome], paths: Sequence[Path], *, concurrency: int,
                 progress: Progress) -> list[Outcome]:
    """Every path through ``classify`` on a thread pool; outcomes in input order. Fatal stops all."""
    outcomes: list[Outcome | None] = [None] * len(paths)
    with progress, ThreadPoolExecutor(concurrency, thread_name_prefix="predict") as pool:
        task = progress.add_task("classifying", total=len(paths))
        futures = {pool.submit(classify, path): index for index, path in enumerate(paths)}
        try:
            for future in as_completed(futures):
                outcomes[futures[future]] = future.result()
                progress.advance(task)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the requests already sent finish (bounded by --timeout)
            raise
    return [outcome for outcome in outcomes if outcome is not None]


def progress_bar(total: int, *, enabled: bool) -> Progress:
    """On stderr, and only on a terminal for more than a handful of images."""
    console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True,
                    disable=not (enabled and console.is_terminal and total > PROGRESS_ABOVE))


# --- output ------------------------------------------------------------------------------------


def print_table(console: Console, outcomes: Sequence[Outcome]) -> None:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("file", overflow="fold")
    table.add_column("label")
    table.add_column("probability", justify="right")
    table.add_column("others")
    for outcome in outcomes:
        if outcome.error is None and outcome.predictions:
            top, *others = outcome.predictions
            # Text, not str: a name like "x[bold].jpg" is not rich markup.
            table.add_row(Text(str(outcome.path)), Text(top.label), f"{top.probability:.4f}",
                          Text(", ".join(f"{p.label} ({p.probability:.4f})" for p in others)))
        elif outcome.error is None:  # a multi-label model that answers none of its labels
            table.add_row(Text(str(outcome.path)), "—", "", "")
    console.print(table)


def write_csv(handle: IO[str], outcomes: Sequence[Outcome]) -> None:
    """One row per prediction (long format: easy to filter, the same columns for any top-k)."""
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(["file", "rank", "label", "index", "probability"])
    for outcome in outcomes:
        for rank, p in enumerate(outcome.predictions, start=1):
            writer.writerow([str(outcome.path), rank, p.label, p.index, p.probability])


def record(outcome: Outcome) -> dict[str, Any]:
    if outcome.error is not None:
        return {"file": str(outcome.path), "error": outcome.error}
    return {"file": str(outcome.path), "predictions": [asdict(p) for p in outcome.predictions]}


def write_json(handle: IO[str], outcomes: Sequence[Outcome]) -> None:
    json.dump([record(outcome) for outcome in outcomes], handle, indent=2)
    handle.write("\n")


def write_results(outcomes: Sequence[Outcome], output_format: str, output: str | None) -> None:
    if output_format == "table":
        if any(outcome.error is None for outcome in outcomes):  # the skipped are listed on stderr
            # Piped or redirected, rich would fit the table to 80 columns; keep whole rows instead.
            stdout = Console()
            print_table(stdout if stdout.is_terminal else Console(width=10_000), outcomes)
        return
    write = write_csv if output_format == "csv" else write_json
    if output is None:
        write(sys.stdout, outcomes)
        return
    with open(output, "w", encoding="utf-8", newline="") as handle:
        write(handle, outcomes)
    print(f"wrote {output}", file=sys.stderr)


def report_skipped(outcomes: Sequence[Outcome], unmatched: Sequence[str]) -> None:
    failed = [outcome for outcome in outcomes if outcome.error is not None]
    if failed:
        print(f"skipped {len(failed)} file{'s' if len(failed) != 1 else ''}:", file=sys.stderr)
        for outcome in failed:
            print(f"  {outcome.path}: {outcome.error}", file=sys.stderr)
    for pattern in unmatched:
        print(f"no image files match {pattern!r}", file=sys.stderr)


# --- the command -------------------------------------------------------------------------------


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080 (docker compose up)")
    target.add_argument("--endpoint", metavar="NAME", help="a SageMaker endpoint (through sagemaker-runtime)")
    parser.add_argument("--target-model", metavar="NAME",
                        help="the model on a multi-model endpoint or server (TargetModel / /models/NAME/invoke)")
    parser.add_argument("--top-k", type=positive(int), metavar="N",
                        help="predictions per image (default: the server's, 5 for ours)")
    parser.add_argument("--concurrency", type=positive(int), default=4, metavar="N",
                        help="requests in flight (default: %(default)s)")
    parser.add_argument("--format", choices=FORMATS, dest="output_format",
                        help="default: from --output's suffix (.csv, .json), else table")
    parser.add_argument("--output", metavar="FILE", help="write csv or json here instead of stdout")
    parser.add_argument("--timeout", type=positive(float), default=60.0, metavar="S",
                        help="seconds to wait for each answer (default: %(default)g)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (it is only drawn on a terminal anyway)")
    aws = parser.add_argument_group("AWS (with --endpoint)")
    aws.add_argument("--region", help="default: the AWS configuration's")
    aws.add_argument("--profile", help="a profile from the AWS configuration (default: AWS_PROFILE or default)")
    parser.add_argument("paths", nargs="+", metavar="PATHS", help="image files, folders or glob patterns")
    return parser


def output_format(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    chosen = args.output_format
    if chosen is None:
        suffix = Path(args.output).suffix.lower().lstrip(".") if args.output else ""
        chosen = suffix if suffix in ("csv", "json") else "table"
    if chosen == "table" and args.output:
        parser.error("--output needs --format csv or json (or a .csv / .json file name)")
    return chosen


def make_client(args: argparse.Namespace, parser: argparse.ArgumentParser, environ: Mapping[str, str],
                runtime_client: Any | None) -> Classifier:
    if args.url:
        if args.region or args.profile:
            parser.error("--region and --profile are for --endpoint")
        if urlsplit(args.url).scheme not in ("http", "https"):
            parser.error(f"--url needs http:// or https://, got {args.url!r}")
        return ServerClient(args.url.rstrip("/"), target_model=args.target_model, top_k=args.top_k,
                            timeout_s=args.timeout, concurrency=args.concurrency)
    runtime = runtime_client or make_runtime_client(args.profile, args.region, args.timeout)
    return EndpointClient(runtime, args.endpoint, target_model=args.target_model, top_k=args.top_k,
                          profile=args.profile or environ.get("AWS_PROFILE"))


def run(client: Classifier, patterns: Sequence[str], *, prog: str = PROG, output_format: str = "table",
        output: str | None = None, concurrency: int = 1, progress: bool = False) -> int:
    """Classify the images ``patterns`` name through ``client`` and print or write the results;
    the exit status (1 when a file was skipped or a pattern matched nothing, or on a fatal error)."""
    found = search(patterns)
    if not found.images:
        print(f"{prog}: error: no image files found in {' '.join(patterns)}", file=sys.stderr)
        return 2
    try:
        try:
            client.check()
            outcomes = classify_all(lambda path: classify_file(client, path), found.images, concurrency=concurrency,
                                    progress=progress_bar(len(found.images), enabled=progress))
        finally:
            client.close()
    except Fatal as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    write_results(outcomes, output_format, output)
    report_skipped(outcomes, found.unmatched)
    return 1 if found.unmatched or any(outcome.error is not None for outcome in outcomes) else 0


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] = os.environ,
         runtime_client: Any | None = None) -> int:
    """Classify the images; ``runtime_client`` replaces the sagemaker-runtime client (tests pass a stubbed one)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen_format = output_format(args, parser)
    if not search(args.paths).images:
        parser.error(f"no image files found in {' '.join(args.paths)}")
    try:
        client = make_client(args, parser, environ, runtime_client)
    except Fatal as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return run(client, args.paths, output_format=chosen_format, output=args.output, concurrency=args.concurrency,
               progress=args.progress)


if __name__ == "__main__":
    sys.exit(main())
