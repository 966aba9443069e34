"""Publish to the Hugging Face Hub (or any Hub-compatible endpoint). The only module that
imports `HfApi`.

One publish is `create_repo(exist_ok=True)` plus one commit holding the GGUFs (LFS), the
mmproj and README.md, and deleting GGUFs of an earlier publish that are not in the new
set, so the repo switches from the old set to the new one in a single commit. Files whose
sha256 already matches the repo are left out of the commit: a card-only change sends no
LFS traffic at all.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import get_token

from qatgguf import __version__
from qatgguf.errors import ModelCardError, PublishError
from qatgguf.hub.base import (
    CARD_PATH,
    RESERVED_PATHS,
    HubLimits,
    PublishResult,
    plan_files,
    scrub,
    split_repo_id,
)
from qatgguf.hub.card import check_card

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
# Files an earlier publish made and a new one replaces; anything else in the repo
# (images for the card, notes added by hand) is left alone.
MANAGED_PATTERNS = ("*.gguf",)


class HubPublisher:
    """`Publisher` to a Hub endpoint. The token comes from `token`, else from the standard
    chain (HF_TOKEN, the stored login); it is never logged or put in an error."""

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        private: bool = False,
        limits: HubLimits | None = None,
        managed_patterns: Sequence[str] = MANAGED_PATTERNS,
    ) -> None:
        self.endpoint = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self.private = private
        self.limits = limits or HubLimits()
        self.managed_patterns = tuple(managed_patterns)
        self._token = token
        self._api = HfApi(
            endpoint=self.endpoint, token=token, library_name="qatgguf", library_version=__version__
        )

    def __repr__(self) -> str:
        return f"HubPublisher(endpoint={self.endpoint!r}, token='***')"

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
        return PublishError(scrub(msg, self._secrets()))

    def _remote_files(self, repo_id: str) -> dict[str, RepoFile]:
        items = self._api.list_repo_tree(repo_id, recursive=True, repo_type="model")
        return {item.path: item for item in items if isinstance(item, RepoFile)}

    def publish(
        self,
        repo_id: str,
        files: Sequence[Path],
        card_text: str,
        *,
        commit_message: str,
    ) -> PublishResult:
        """Raises PublishError (limits, token, network, Hub errors) or ModelCardError."""
        plan = plan_files(repo_id, files, limits=self.limits)
        split_repo_id(repo_id)
        check_card(card_text)
        step = "create_repo"
        try:
            self._api.create_repo(repo_id, repo_type="model", exist_ok=True, private=self.private)
            step = "list files"
            remote = self._remote_files(repo_id)
            step = "hash files"
            operations: list[CommitOperationAdd | CommitOperationDelete] = []
            unchanged: list[str] = []
            for name, path in plan.items():
                # CommitOperationAdd hashes the file once here; the client reuses the digest.
                op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                have = remote.get(name)
                if (
                    have is not None
                    and have.lfs is not None
                    and have.lfs.sha256 == op.upload_info.sha256.hex()
                ):
                    unchanged.append(name)
                    continue
                operations.append(op)
            operations.append(
                CommitOperationAdd(path_in_repo=CARD_PATH, path_or_fileobj=card_text.encode())
            )
            stale = sorted(
                p
                for p in remote
                if p not in plan
                and p not in RESERVED_PATHS
                and any(fnmatch.fnmatch(p, pat) for pat in self.managed_patterns)
            )
            operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
            step = "commit"
            log.info(
                "publishing %s to %s: %d file(s) to upload, %d unchanged, %d stale to delete",
                repo_id,
                self.endpoint,
                len(operations) - 1 - len(stale),
                len(unchanged),
                len(stale),
            )
            info = self._api.create_commit(
                repo_id, operations, commit_message=commit_message, repo_type="model"
            )
        except HfHubHTTPError as exc:
            raise self._error(exc, repo_id=repo_id, step=step) from None
        except ValueError as exc:
            text = " ".join(scrub(str(exc), self._secrets()).split())  # one line for logs
            if "Invalid metadata in README.md" in text:
                # The client turns a 400 from /api/validate-yaml into this ValueError.
                raise ModelCardError(
                    f"{self.endpoint}/{repo_id}: the Hub refused README.md: {text}; fix the card "
                    "data or the template"
                ) from None
            raise PublishError(f"{self.endpoint}/{repo_id}: {step} failed: {text}") from None
        except (httpx2.HTTPError, OSError) as exc:
            raise self._error(exc, repo_id=repo_id, step=step) from None
        names = tuple(sorted([*plan, CARD_PATH]))
        log.info("published %s at commit %s", repo_id, info.oid)
        return PublishResult(
            repo_id=repo_id, url=f"{self.endpoint}/{repo_id}", commit=info.oid, files=names
        )
