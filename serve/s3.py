"""Images named by S3 URI in JSON requests, from an allow-list of buckets only.

Only ``s3://bucket/key`` of a listed bucket is fetched (with the endpoint's own role), never an
arbitrary URL, so a request cannot make the server reach anything else (no SSRF).
"""

from __future__ import annotations

import re
import threading
from typing import Any

from serve.errors import BadRequest, Forbidden, PayloadTooLarge

S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>.+)$")
MAX_OBJECT_BYTES = 20 * 1024 * 1024


class S3Fetcher:
    def __init__(self, buckets: frozenset[str], *, client: Any = None, max_bytes: int = MAX_OBJECT_BYTES) -> None:
        self.buckets = buckets
        self.max_bytes = max_bytes
        self._client = client
        self._lock = threading.Lock()

    def _s3(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=20)
                self._client = boto3.client("s3", config=config)
            return self._client

    def __call__(self, uri: str) -> bytes:
        match = S3_URI.match(uri)
        if match is None:
            raise BadRequest(f"{uri!r} is not an s3://bucket/key URI")
        bucket, key = match["bucket"], match["key"]
        if bucket not in self.buckets:
            raise Forbidden(f"bucket {bucket!r} is not among the buckets this endpoint may read")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._s3().get_object(Bucket=bucket, Key=key)
            if response.get("ContentLength", 0) > self.max_bytes:
                raise PayloadTooLarge(f"{uri} is {response['ContentLength']} bytes; the limit is {self.max_bytes}")
            return response["Body"].read(self.max_bytes + 1)[: self.max_bytes + 1]
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise BadRequest(f"cannot read {uri}: {code}") from None
        except BotoCoreError as exc:
            raise BadRequest(f"cannot read {uri}: {type(exc).__name__}") from None
