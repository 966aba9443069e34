"""Artifact store on S3 or any S3-compatible server (MinIO, nanio, moto). The only module
that imports boto3.

Objects only ever appear complete: a PutObject or CompleteMultipartUpload makes the whole
object visible at once, and a failed multipart upload is aborted by boto3's transfer
manager. Each object carries its sha256 as user metadata (`x-amz-meta-sha256`), so `stat`
is one HEAD request.

The sha256 has to be known before the upload starts (S3 metadata is fixed when the upload
is created), so `put_file` hashes the file once, then uploads it through a reader that
hashes again and fails the upload before its last byte if the file changed in between.
The first pass also lets an unchanged re-run skip the upload entirely.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from qatgguf.errors import StoreError
from qatgguf.files import atomic_output, sha256_file
from qatgguf.store.base import (
    ArtifactRef,
    HashingReader,
    JsonOverBytes,
    ObjectInfo,
    ProgressCallback,
    S3Credentials,
    check_sha256,
    validate_key,
    validate_prefix,
)

MiB = 1024 * 1024
# ref: AWS S3 limits: parts are 5 MiB..5 GiB, at most 10,000 per upload. 64 MiB parts
# cover objects up to 625 GiB, well past the Hub's 50 GB per-file limit.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_MULTIPART_CHUNKSIZE = 64 * MiB

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_AUTH = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_ENV_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
log = logging.getLogger(__name__)


def _quiet_botocore_debug() -> None:
    """Keep botocore's DEBUG records off: they print the signed request headers, and the
    Authorization header holds the access key id. A level set on purpose is kept."""
    for name in ("botocore", "boto3"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


class _HashingWriter:
    """Write-only, non-seekable sink: boto3 then writes the ranges in order, so the digest
    can be computed while the download streams to disk."""

    def __init__(self, f: Any, *, md5: bool = False) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        if self.md5 is not None:
            self.md5.update(data)
        self.size += len(data)
        return self._f.write(data)


class S3Store(JsonOverBytes):
    """`ArtifactStore` over `s3://bucket/prefix`. Create with `open_store("s3://...")`.

    Credentials come from `credentials` when given, else from boto3's standard chain
    (environment, shared config, instance role). They never appear in `repr` or errors.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        credentials: S3Credentials | None = None,
        region: str | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        max_concurrency: int = 4,
    ) -> None:
        if not bucket or "/" in bucket:
            raise StoreError(f"s3 bucket name {bucket!r} is not valid; use s3://bucket/prefix")
        if multipart_chunksize < MIN_PART_SIZE:
            raise StoreError(
                f"s3://{bucket}: multipart_chunksize {multipart_chunksize} is below S3's "
                f"minimum part size {MIN_PART_SIZE}; raise it"
            )
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self._credentials = credentials
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
        )
        self._client: Any = None

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Store({self.uri_for_root()!r}{where})"

    def __getstate__(self) -> dict[str, Any]:
        # A boto3 client cannot be pickled; a copy sent to another process makes its own.
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self) -> Any:
        if self._client is None:
            _quiet_botocore_debug()
            creds = self._credentials
            session = boto3.session.Session(
                aws_access_key_id=creds.access_key_id if creds else None,
                aws_secret_access_key=creds.secret_access_key if creds else None,
                aws_session_token=creds.session_token if creds else None,
                region_name=self.region,
            )
            config = Config(
                retries={"max_attempts": 5, "mode": "standard"},
                # Custom endpoints (MinIO, nanio, moto) rarely resolve bucket subdomains.
                s3={"addressing_style": "path"} if self.endpoint_url else None,
            )
            self._client = session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region or session.region_name or "us-east-1",
                config=config,
            )
        return self._client

    # -- keys, URIs, errors ------------------------------------------------------------

    def uri_for_root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _key_of(self, key_or_uri: str) -> str:
        if "://" not in key_or_uri:
            return validate_key(key_or_uri)
        root = self.uri_for_root() + "/"
        if not key_or_uri.startswith(root):
            raise StoreError(
                f"{key_or_uri}: not in this store ({self.uri_for_root()}); open the store "
                "the URI belongs to"
            )
        return validate_key(key_or_uri[len(root) :])

    def _scrub(self, text: str) -> str:
        secrets = list(self._credentials.secrets()) if self._credentials else []
        secrets += [v for name in _ENV_SECRETS if (v := os.environ.get(name))]
        for secret in secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def _error(self, exc: Exception, *, op: str, key: str | None) -> StoreError:
        """A StoreError naming the bucket, key and operation; never the credentials."""
        where = self.uri_for(key) if key is not None else self.uri_for_root()
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "?"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            detail = str(err.get("Message") or "")
            if code in _NOT_FOUND:
                fix = "no such object; check the key or run the step that stores it"
            elif code == "NoSuchBucket":
                fix = f"bucket {self.bucket!r} does not exist; create it or fix the store URL"
            elif code in _AUTH:
                fix = "the credentials were rejected; check the AWS credentials configured"
            elif code in {"AccessDenied", "403"}:
                fix = f"access denied; the credentials need s3 permissions on {self.bucket!r}"
            else:
                fix = "see the S3 error code"
            msg = f"{where}: {op} failed: S3 error {code} (HTTP {status}) {detail}".rstrip()
            msg = f"{msg}; {fix}"
        elif isinstance(exc, BotoCoreError | Boto3Error):
            endpoint = self.endpoint_url or "the AWS endpoint"
            msg = (
                f"{where}: {op} failed: {type(exc).__name__}: {exc}; check that {endpoint} is "
                "reachable and the credentials are configured"
            )
        else:
            msg = f"{where}: {op} failed: {type(exc).__name__}: {exc}"
        return StoreError(self._scrub(msg))

    def _head(self, key: str, *, op: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                return None
            raise self._error(exc, op=op, key=key) from None
        except (BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op=op, key=key) from None

    # -- protocol ----------------------------------------------------------------------

    def put_file(
        self, path: str | Path, key: str, *, progress: ProgressCallback | None = None,
        exclusive: bool = False,
    ) -> ArtifactRef:
        src = Path(path)
        uri = self.uri_for(key)
        if not src.is_file():
            raise StoreError(f"{src}: cannot store as {uri}: not a regular file")
        sha256, size = sha256_file(src)
        parts = -(-size // self._transfer.multipart_chunksize)
        if size >= self._transfer.multipart_threshold and parts > MAX_PARTS:
            raise StoreError(
                f"{src}: {size} bytes need {parts} parts of {self._transfer.multipart_chunksize}"
                f" bytes, S3 allows {MAX_PARTS}; raise multipart_chunksize"
            )
        head = self._head(key, op="put_file")
        if (
            head is not None
            and head.get("Metadata", {}).get("sha256") == sha256
            and int(head["ContentLength"]) == size
        ):
            # Same bytes already stored: re-runs of a task cost one HEAD, not an upload.
            if progress is not None:
                progress(size)
            return ArtifactRef(uri=uri, sha256=sha256, size=size)
        if exclusive:
            if head is not None:
                return self._first_writer(key, head, sha256)
            return self._put_exclusive(src, key, sha256=sha256, size=size, progress=progress)
        try:
            with open(src, "rb") as f:
                reader = HashingReader(
                    f, uri=uri, expect_sha256=sha256, expect_size=size, progress=progress
                )
                self.client.upload_fileobj(
                    reader,
                    self.bucket,
                    self._full(key),
                    ExtraArgs={"Metadata": {"sha256": sha256}},
                    Config=self._transfer,
                )
        except StoreError:
            raise
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op="put_file", key=key) from None
        except OSError as exc:
            raise StoreError(f"{src}: storing as {uri} failed: {exc.strerror or exc}") from exc
        return ArtifactRef(uri=uri, sha256=sha256, size=size)

    def _first_writer(self, key: str, head: dict[str, Any], ours: str) -> ArtifactRef:
        """The object another writer stored first under a content key we also computed."""
        stored = head.get("Metadata", {}).get("sha256")
        if stored is None:
            ref = self.stat(key)
            assert ref is not None
            return ref
        if stored != ours:
            log.warning("%s: kept the object stored first (sha256 %s); this run computed %s",
                        self.uri_for(key), stored[:12], ours[:12])
        return ArtifactRef(uri=self.uri_for(key), sha256=stored, size=int(head["ContentLength"]))

    def _put_exclusive(
        self, src: Path, key: str, *, sha256: str, size: int, progress: ProgressCallback | None
    ) -> ArtifactRef:
        """Write only if the key does not exist: PutObject or CompleteMultipartUpload with
        `If-None-Match: *` (boto3's transfer manager does not pass that header, so the
        multipart upload is driven here; an unfinished one is aborted, never left behind).
        ref: AWS S3 conditional writes (PutObject / CompleteMultipartUpload If-None-Match)"""
        uri = self.uri_for(key)
        full = self._full(key)
        chunk = self._transfer.multipart_chunksize
        upload_id = None
        try:
            with open(src, "rb") as f:
                reader = HashingReader(f, uri=uri, expect_sha256=sha256, expect_size=size, progress=progress)
                if size < self._transfer.multipart_threshold:
                    body = reader.read(size) + reader.read(1)  # the second read checks the end
                    self.client.put_object(
                        Bucket=self.bucket, Key=full, Body=body, Metadata={"sha256": sha256},
                        ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode(), IfNoneMatch="*",
                    )
                else:
                    upload_id = self.client.create_multipart_upload(
                        Bucket=self.bucket, Key=full, Metadata={"sha256": sha256})["UploadId"]
                    parts = []
                    number = 1
                    while data := reader.read(chunk):
                        etag = self.client.upload_part(
                            Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data)["ETag"]
                        parts.append({"PartNumber": number, "ETag": etag})
                        number += 1
                    reader.read(1)
                    self.client.complete_multipart_upload(
                        Bucket=self.bucket, Key=full, UploadId=upload_id,
                        MultipartUpload={"Parts": parts}, IfNoneMatch="*")
                    upload_id = None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                head = self._head(key, op="put_file")
                if head is not None:
                    return self._first_writer(key, head, sha256)
            raise self._error(exc, op="put_file", key=key) from None
        except (BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op="put_file", key=key) from None
        except OSError as exc:
            raise StoreError(f"{src}: storing as {uri} failed: {exc.strerror or exc}") from exc
        finally:
            if upload_id is not None:
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
                except (ClientError, BotoCoreError, Boto3Error) as exc:
                    log.warning("%s: could not abort multipart upload: %s", uri, self._scrub(str(exc)))
        return ArtifactRef(uri=uri, sha256=sha256, size=size)

    def get_file(
        self, key_or_uri: str, dest: str | Path, *, sha256: str | None = None, etag: str | None = None
    ) -> Path:
        key = self._key_of(key_or_uri)
        uri = self.uri_for(key)
        if sha256 is not None:
            check_sha256(sha256, what=uri)
        head = self._head(key, op="get_file")
        if head is None:
            raise StoreError(
                f"{uri}: get_file failed: no such object in bucket {self.bucket!r} "
                f"(key {self._full(key)!r}); check the key or run the step that stores it"
            )
        if etag is not None and str(head.get("ETag", "")).strip('"') != etag:
            raise StoreError(f"{uri}: the object changed (ETag {str(head.get('ETag', '')).strip(chr(34))}, the "
                             f"plan saw {etag}); the source was replaced after planning: plan again")
        stored = head.get("Metadata", {}).get("sha256")
        # an ETag without a part count is the MD5 of the body: check it when no sha256 is known
        md5 = etag if etag is not None and sha256 is None and stored is None and "-" not in etag else None
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / key.rsplit("/", 1)[-1]
        try:
            with atomic_output(dest, tmp=dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")) as tmp:
                with open(tmp, "xb") as f:
                    sink = _HashingWriter(f, md5=md5 is not None)
                    self.client.download_fileobj(
                        self.bucket, self._full(key), sink, Config=self._transfer
                    )
                    f.flush()
                    os.fsync(f.fileno())
                got = sink.hash.hexdigest()
                if md5 is not None and sink.md5 is not None and sink.md5.hexdigest() != md5:
                    raise StoreError(f"{uri}: MD5 {sink.md5.hexdigest()} differs from the ETag {md5}; the "
                                     "download is corrupt: retry")
                for want, source in ((sha256, "expected"), (stored, "stored")):
                    if want is not None and got != want:
                        raise StoreError(
                            f"{uri}: sha256 mismatch: {source} {want}, downloaded {got}; the "
                            "object is corrupt or not the one referenced; re-run the step that "
                            "stores it"
                        )
        except StoreError:
            raise
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op="get_file", key=key) from None
        except OSError as exc:
            raise StoreError(f"{uri}: get_file to {dest} failed: {exc.strerror or exc}") from exc
        return dest

    def exists(self, key: str) -> bool:
        return self._head(key, op="exists") is not None

    def stat(self, key: str) -> ArtifactRef | None:
        head = self._head(key, op="stat")
        if head is None:
            return None
        sha256 = head.get("Metadata", {}).get("sha256")
        if sha256 is None:
            # Written by another tool: hash it once by streaming (no metadata to trust).
            sha256 = hashlib.sha256(self._get(key, op="stat")[0]).hexdigest()
        return ArtifactRef(uri=self.uri_for(key), sha256=sha256, size=int(head["ContentLength"]))

    def put_bytes(self, data: bytes, key: str, *, exclusive: bool = False) -> ArtifactRef:
        digest = hashlib.sha256(data)
        extra = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._full(key),
                Body=data,
                Metadata={"sha256": digest.hexdigest()},
                # The server checks the body against it, so a damaged request is refused.
                ChecksumSHA256=base64.b64encode(digest.digest()).decode(),
                **extra,
            )
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if exclusive and status in (409, 412):
                head = self._head(key, op="put_bytes")
                if head is not None:
                    return self._first_writer(key, head, digest.hexdigest())
            raise self._error(exc, op="put_bytes", key=key) from None
        except (BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op="put_bytes", key=key) from None
        return ArtifactRef(uri=self.uri_for(key), sha256=digest.hexdigest(), size=len(data))

    def info(self, key: str) -> ObjectInfo | None:
        head = self._head(key, op="info")
        if head is None:
            return None
        return ObjectInfo(key=key, size=int(head["ContentLength"]), sha256=head.get("Metadata", {}).get("sha256"),
                          etag=str(head.get("ETag", "")).strip('"') or None, version_id=head.get("VersionId"),
                          modified=head["LastModified"].timestamp() if head.get("LastModified") else None)

    def read_range(self, key_or_uri: str, start: int, length: int, *, etag: str | None = None) -> bytes:
        key = self._key_of(key_or_uri)
        if start < 0 or length < 1:
            raise StoreError(f"{self.uri_for(key)}: read_range({start}, {length}) needs start >= 0 and length >= 1")
        extra = {"IfMatch": f'"{etag}"'} if etag else {}
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._full(key),
                                          Range=f"bytes={start}-{start + length - 1}", **extra)
            return resp["Body"].read()
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412:
                raise StoreError(f"{self.uri_for(key)}: the object changed (its ETag is no longer {etag}); "
                                 "the source was replaced while reading it: plan again") from None
            if status == 416:
                return b""
            raise self._error(exc, op="read_range", key=key) from None
        except (BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op="read_range", key=key) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op="delete", key=key) from None

    def list_incomplete_uploads(self) -> list[tuple[str, str]]:
        """(key, upload id) of every multipart upload under this store's prefix that was
        started and neither completed nor aborted (left by a killed task)."""
        base = f"{self.prefix}/" if self.prefix else ""
        found: list[tuple[str, str]] = []
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=base):
                found += [(u["Key"][len(base):], u["UploadId"]) for u in page.get("Uploads", [])]
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op="list_multipart_uploads", key=None) from None
        return found

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._full(key), UploadId=upload_id)
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op="abort_multipart_upload", key=key) from None

    def _get(self, key: str, *, op: str) -> tuple[bytes, dict[str, str]]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            return resp["Body"].read(), resp.get("Metadata", {})
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                raise StoreError(
                    f"{self.uri_for(key)}: {op} failed: no such object in bucket "
                    f"{self.bucket!r} (key {self._full(key)!r}); check the key or run the "
                    "step that stores it"
                ) from None
            raise self._error(exc, op=op, key=key) from None
        except (BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op=op, key=key) from None

    def get_bytes(self, key_or_uri: str) -> bytes:
        key = self._key_of(key_or_uri)
        data, metadata = self._get(key, op="get_bytes")
        stored = metadata.get("sha256")
        got = hashlib.sha256(data).hexdigest()
        if stored is not None and stored != got:
            raise StoreError(
                f"{self.uri_for(key)}: sha256 mismatch: stored {stored}, read {got}; the object "
                "is corrupt or was overwritten while reading; retry"
            )
        return data

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        validate_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        out: list[ObjectInfo] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix):
                out += [ObjectInfo(key=o["Key"][len(base):], size=int(o["Size"]), sha256=None,
                                   etag=str(o.get("ETag", "")).strip('"') or None,
                                   modified=o["LastModified"].timestamp()) for o in page.get("Contents", [])]
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op="list", key=None) from None
        return sorted(out, key=lambda o: o.key)

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix
            )
            for page in pages:
                keys.extend(obj["Key"][len(base) :] for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, op="list", key=None) from None
        return sorted(keys)
