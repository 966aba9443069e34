"""Publish to the Hugging Face Hub (or any Hub-compatible endpoint). The only module that
imports `HfApi`.

One publish is one commit, made against the head the publisher listed:

1. read the repo: head commit, files (with LFS sha256) and `qatgguf-manifest.json`;
2. plan (`qatgguf.hub.manifest.plan_repo`): write the release's files that differ, the
   card, its assets and the manifest; delete only manifest-listed files this release
   replaces;
3. `create_commit(..., parent_commit=head)`. If another commit landed in between, the Hub
   answers 412: go back to 1. HTTP 429/5xx and dropped connections wait (Retry-After when
   given) and go back to 1 too, within `RetryPolicy`'s attempts and time.

Going back to 1 after any fault makes a retried publish end with exactly one new commit:
files that arrived already are reported by the Hub (preupload oid, LFS batch without
actions) and not sent again, and a commit that landed before its answer was lost leaves
nothing to do. The client's own `http_backoff` already retries 429/5xx and dropped
connections of the preupload, LFS batch, upload and verify requests.

The repo is created only when there is something to commit, after the card and files
passed every local check and the Hub's card validation. The token is never logged, never
put in an error, and never sent to a plain-http endpoint that is not on loopback.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, get_session, get_token, hf_raise_for_status

from qatgguf import __version__
from qatgguf.errors import ModelCardError, PublishError
from qatgguf.hub.base import (
    RESERVED_PATHS,
    CollectionRef,
    HubLimits,
    PublishResult,
    RetryPolicy,
    plan_files,
    scrub,
    split_repo_id,
)
from qatgguf.hub.card import check_card
from qatgguf.hub.manifest import (
    MANIFEST_PATH,
    Manifest,
    ReleaseUpload,
    RemoteFile,
    check_release_paths,
    plan_repo,
)

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
# ref: huggingface_hub utils/_http.py _DEFAULT_RETRY_ON_STATUS_CODES (what http_backoff
# retries): rate limits and server errors are worth another try, nothing else is.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
T = TypeVar("T")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_transport(endpoint: str, token: str | None) -> None:
    """Raise PublishError when `token` would travel in clear text: a plain-http endpoint
    off loopback. The message never holds the token."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PublishError(f"Hub endpoint {endpoint!r} is not an http(s) URL")
    if token and parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise PublishError(
            f"Hub endpoint {endpoint} is plain http on {parts.hostname}, which is not loopback: "
            "refusing to send the token in clear text; use https (or a 127.0.0.1 test server)"
        )


def _retry_after(exc: HfHubHTTPError) -> float | None:
    """Seconds the server asked to wait (Retry-After: delay-seconds), if it did."""
    if exc.response is None:
        return None
    value = exc.response.headers.get("Retry-After", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff


@dataclass(frozen=True)
class _RepoState:
    head: str
    private: bool
    files: dict[str, RemoteFile]
    manifest: Manifest | None


class _Transient(Exception):
    """A fault worth another attempt: why, and how long the server asked to wait."""

    def __init__(self, reason: str, wait: float | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


class HubPublisher:
    """`Publisher` to a Hub endpoint. The token comes from `token`, else from the standard
    chain (HF_TOKEN, the stored login), resolved once here."""

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        private: bool = False,
        limits: HubLimits | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self.private = private
        self.limits = limits or HubLimits()
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._token = token or get_token()
        check_token_transport(self.endpoint, self._token)
        self._api = HfApi(
            endpoint=self.endpoint,
            # False: never fall back to another token found later in the environment.
            token=self._token or False,
            library_name="qatgguf",
            library_version=__version__,
        )

    def __repr__(self) -> str:
        return f"HubPublisher(endpoint={self.endpoint!r}, token='***')"

    # -- errors --------------------------------------------------------------------------

    def _secrets(self) -> list[str | None]:
        return [self._token, get_token()]

    def _error(self, exc: Exception, *, repo_id: str, step: str) -> PublishError:
        where = f"{self.endpoint}/{repo_id}"
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            status = exc.response.status_code
            server = exc.server_message or ""
            if status == 401 and not isinstance(exc, RepositoryNotFoundError):
                fix = "the Hub rejected the token; set a valid write token (HF_TOKEN)"
            elif status == 401 or isinstance(exc, RepositoryNotFoundError):
                fix = "the repo does not exist or the token cannot see it; check repo id and token"
            elif status == 403:
                fix = f"the token has no write access to {repo_id}; use a token with write scope"
            else:
                fix = "see the Hub's message"
            said = server.strip() or type(exc).__name__
            msg = f"{where}: {step} failed: HTTP {status}: {said}; {fix}"
        elif isinstance(exc, httpx2.HTTPError):
            reach = f"cannot reach {self.endpoint}"
            msg = f"{where}: {step} failed: {reach} ({type(exc).__name__}: {exc})"
        else:
            msg = f"{where}: {step} failed: {type(exc).__name__}: {exc}"
        return PublishError(scrub(" ".join(msg.split()), self._secrets()))

    def _classify(self, exc: Exception, *, repo_id: str, step: str) -> _Transient:
        """A transient fault, or raise the clear error for a permanent one."""
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            status = exc.response.status_code
            if status == 412:
                return _Transient(f"HTTP 412 on {step}: another commit moved the branch", 0.0)
            if status in TRANSIENT_STATUS:
                return _Transient(f"HTTP {status} on {step}", _retry_after(exc))
            raise self._error(exc, repo_id=repo_id, step=step) from None
        if isinstance(exc, httpx2.TransportError):
            return _Transient(f"{type(exc).__name__} on {step} (connection dropped)", None)
        raise self._error(exc, repo_id=repo_id, step=step) from None

    def _wait(self, fault: _Transient, *, n: int, started: float, attempts: int) -> float:
        """The pause before the next attempt; raises PublishError when the policy is spent."""
        p = self.retry
        if fault.wait is not None:
            wait = fault.wait
        else:
            wait = min(p.max_wait, p.base_wait * 2 ** (n - 1))
        elapsed = time.monotonic() - started
        if attempts >= p.max_attempts or elapsed + wait > p.max_seconds:
            raise PublishError(
                f"{self.endpoint}: gave up after {attempts} attempt(s) in {elapsed:.1f} s "
                f"(RetryPolicy max_attempts={p.max_attempts}, max_seconds={p.max_seconds}); "
                f"last fault: {fault.reason}"
            )
        return wait

    def _retrying(self, step: str, repo_id: str, fn: Callable[[], T]) -> T:
        """Run an idempotent call, retrying transient faults within the policy."""
        started = time.monotonic()
        n = 0
        while True:
            n += 1
            try:
                return fn()
            except (HfHubHTTPError, httpx2.HTTPError) as exc:
                fault = self._classify(exc, repo_id=repo_id, step=step)
            wait = self._wait(fault, n=n, started=started, attempts=n)
            log.warning("%s: %s; retrying in %.1f s", repo_id, fault.reason, wait)
            self._sleep(wait)

    # -- reading the repo ----------------------------------------------------------------

    def _state(self, repo_id: str) -> _RepoState | None:
        try:
            info = self._api.repo_info(repo_id, repo_type="model", revision="main")
        except RepositoryNotFoundError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                return None
            raise
        head = str(info.sha)
        files: dict[str, RemoteFile] = {}
        for item in self._api.list_repo_tree(repo_id, recursive=True, revision=head):
            if isinstance(item, RepoFile):
                files[item.path] = RemoteFile(
                    item.path,
                    int(item.size),
                    item.lfs.sha256 if item.lfs is not None else None,
                    None if item.lfs is not None else item.blob_id,
                )
        manifest = None
        if MANIFEST_PATH in files:
            url = hf_hub_url(repo_id, MANIFEST_PATH, revision=head, endpoint=self.endpoint)
            from huggingface_hub.utils import http_backoff

            r = http_backoff("GET", url, headers=self._headers(), follow_redirects=True)
            hf_raise_for_status(r)
            manifest = Manifest.from_json(r.content, where=f"{self.endpoint}/{repo_id}")
        return _RepoState(head, bool(info.private), files, manifest)

    def _headers(self) -> dict[str, str]:
        return build_hf_headers(
            token=self._token or False, library_name="qatgguf", library_version=__version__
        )

    def _validate_card(self, repo_id: str, card_text: str) -> None:
        """The Hub's own card check (`/api/validate-yaml`, what create_commit calls),
        before a repo is created for it."""
        r = get_session().post(
            f"{self.endpoint}/api/validate-yaml",
            json={"content": card_text, "repoType": "model"},
            headers=self._headers(),
        )
        if r.status_code == 400:
            errors = "; ".join(str(e.get("message")) for e in r.json().get("errors", []))
            raise ModelCardError(
                f"{self.endpoint}/{repo_id}: the Hub refused README.md: {errors}; fix the card "
                "data or the template"
            )
        hf_raise_for_status(r)

    def _create(self, repo_id: str) -> None:
        self._api.create_repo(repo_id, repo_type="model", exist_ok=True, private=self.private)
        log.info("created %s at %s (private=%s)", repo_id, self.endpoint, self.private)

    def _check_private(self, repo_id: str, state: _RepoState) -> None:
        if self.private and not state.private:
            raise PublishError(
                f"{self.endpoint}/{repo_id}: publish.private is true but the repo is public; "
                "nothing was published. Make the repo private on the Hub, or set "
                "publish.private: false to publish in the open"
            )

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self, repo_id: str, upload: ReleaseUpload, *, commit_message: str
    ) -> PublishResult:
        """Publish one release in one commit. Raises PublishError (limits, names, token,
        privacy, network, Hub errors, retries spent) or ModelCardError (the card)."""
        plan = plan_files(repo_id, upload.files, limits=self.limits)
        check_release_paths(upload, RESERVED_PATHS)
        split_repo_id(repo_id)
        # Each file is hashed once, here; every attempt copies these templates.
        templates = {
            name: CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(f.path)))
            for name, f in plan.items()
        }
        digests = {
            name: (op.upload_info.sha256.hex(), op.upload_info.size)
            for name, op in templates.items()
        }
        started = time.monotonic()
        retries: list[str] = []
        attempts = 0
        n_faults = 0
        commit_sent = False
        validated: str | None = None
        while True:
            attempts += 1
            step = "read repo"
            try:
                state = self._state(repo_id)
                step = "plan"
                repo_plan, generated = plan_repo(
                    repo_id,
                    upload,
                    digests=digests,
                    remote=state.files if state else {},
                    previous=state.manifest if state else None,
                )
                check_card(repo_plan.card_text)
                if validated != repo_plan.card_text:
                    step = "validate card"
                    self._validate_card(repo_id, repo_plan.card_text)
                    validated = repo_plan.card_text
                if state is None:
                    step = "create_repo"
                    self._create(repo_id)
                    attempts -= 1  # creating the repo is not a commit attempt
                    continue  # read it back: privacy, head, the Hub's first files
                self._check_private(repo_id, state)
                if not repo_plan.changed:
                    log.info("%s: already holds release %s; no commit", repo_id, upload.release_id)
                    return self._result(
                        repo_id, state.head, repo_plan, state, committed=commit_sent,
                        attempts=attempts, retries=retries,
                    )
                operations: list[CommitOperationAdd | CommitOperationDelete] = []
                for path in repo_plan.writes:
                    if path in templates:
                        operations.append(copy.copy(templates[path]))
                    else:
                        operations.append(CommitOperationAdd(path, generated[path]))
                operations += [CommitOperationDelete(path_in_repo=p) for p in repo_plan.deletes]
                log.info(
                    "publishing %s to %s (attempt %d): write %s; delete %s; keep %s",
                    repo_id, self.endpoint, attempts, list(repo_plan.writes),
                    list(repo_plan.deletes), [e.path for e in repo_plan.kept],
                )
                step = "commit"
                commit_sent = True
                info = self._api.create_commit(
                    repo_id,
                    operations,
                    commit_message=commit_message,
                    repo_type="model",
                    revision="main",
                    parent_commit=state.head,
                )
            except (HfHubHTTPError, httpx2.HTTPError) as exc:
                fault = self._classify(exc, repo_id=repo_id, step=step)
            except (ModelCardError, PublishError):
                raise
            except ValueError as exc:
                text = " ".join(scrub(str(exc), self._secrets()).split())  # one line for logs
                if "Invalid metadata in README.md" in text:
                    # The client turns a 400 from /api/validate-yaml into this ValueError.
                    raise ModelCardError(
                        f"{self.endpoint}/{repo_id}: the Hub refused README.md: {text}; fix the "
                        "card data or the template"
                    ) from None
                raise PublishError(f"{self.endpoint}/{repo_id}: {step} failed: {text}") from None
            except OSError as exc:
                raise self._error(exc, repo_id=repo_id, step=step) from None
            else:
                log.info("published %s at commit %s", repo_id, info.oid)
                after = dict(state.files)
                for p in repo_plan.deletes:
                    after.pop(p, None)
                return self._result(
                    repo_id, str(info.oid), repo_plan, state, committed=True, attempts=attempts,
                    retries=retries, after=sorted({*after, *repo_plan.writes}),
                )
            if not fault.reason.startswith("HTTP 412"):
                n_faults += 1
            wait = self._wait(fault, n=max(n_faults, 1), started=started, attempts=attempts)
            retries.append(fault.reason)
            log.warning("%s: %s; re-reading the repo and retrying in %.1f s", repo_id,
                        fault.reason, wait)
            if wait:
                self._sleep(wait)

    def _result(
        self,
        repo_id: str,
        commit: str,
        plan,
        state: _RepoState,
        *,
        committed: bool,
        attempts: int,
        retries: list[str],
        after: list[str] | None = None,
    ) -> PublishResult:
        files = after if after is not None else sorted(state.files)
        return PublishResult(
            repo_id=repo_id,
            url=f"{self.endpoint}/{repo_id}",
            commit=commit,
            files=tuple(p for p in files if p not in (".gitattributes", MANIFEST_PATH)),
            committed=committed,
            written=plan.writes if committed else (),
            deleted=plan.deletes if committed else (),
            kept=tuple(e.path for e in plan.kept),
            attempts=attempts,
            retries=tuple(retries),
        )

    # -- collections ---------------------------------------------------------------------

    def _ref(self, c) -> CollectionRef:
        items = tuple(it.item_id for it in sorted(c.items, key=lambda it: it.position))
        return CollectionRef(slug=c.slug, title=c.title, url=c.url, items=items)

    def ensure_collection(self, title: str, *, namespace: str) -> CollectionRef:
        """The collection `title` owned by `namespace`, created when missing (never a
        second one of the same title)."""
        def find():
            for c in self._api.list_collections(owner=namespace):
                if c.title == title:
                    return self._api.get_collection(c.slug)
            return self._api.create_collection(
                title, namespace=namespace, private=self.private, exists_ok=True
            )

        return self._ref(self._retrying("collection", f"{namespace}/{title}", find))

    def _repo_size(self, repo_id: str) -> float:
        """The sort key of a repo in the collection: its model GGUFs (mmproj excluded),
        summed; unreadable repos go last."""
        try:
            info = self._api.model_info(repo_id, files_metadata=True)
        except HfHubHTTPError:
            return float("inf")
        return float(
            sum(
                s.size or 0
                for s in info.siblings or ()
                if s.rfilename.endswith(".gguf") and "mmproj" not in s.rfilename
            )
        )

    def add_to_collection(self, collection: CollectionRef, repo_id: str) -> CollectionRef:
        """Add `repo_id` (once) and move the collection's model repos into size order with
        in-place position updates."""
        slug = collection.slug

        def update():
            c = self._api.add_collection_item(slug, repo_id, "model", exists_ok=True)
            c = self._api.get_collection(slug)
            items = sorted(c.items, key=lambda it: it.position)
            models = [it for it in items if it.item_type == "model"]
            # ties (two sizes with equal files) by name, so the order does not depend on
            # which model happened to publish first
            want = sorted(models, key=lambda it: (self._repo_size(it.item_id), it.item_id))
            order = [it.item_object_id for it in items]
            for i, it in enumerate(want):
                if order[i] != it.item_object_id:
                    self._api.update_collection_item(slug, it.item_object_id, position=i)
                    order.remove(it.item_object_id)
                    order.insert(i, it.item_object_id)
            return self._api.get_collection(slug)

        return self._ref(self._retrying("collection", repo_id, update))
