"""SAEs on the Hugging Face Hub: `hf://` paths that `SparseAutoencoder.load` (and whatever resolves its SAE
paths through `resolve_sae_path`) reads like a local folder.

    hf://OWNER/REPO/SUBFOLDER              the SAE folder SUBFOLDER of the model repo OWNER/REPO, branch main
    hf://OWNER/REPO/SUBFOLDER@REVISION     at a branch, tag or commit (also hf://OWNER/REPO@REVISION/SUBFOLDER,
                                           huggingface_hub's own URI form: `parse_hf_uri`)
    hf://OWNER/REPO                        a repo whose root is the SAE folder
    hf://OWNER/REPO/PATH/ae.pt             a single-file layout (an OpenAI or dictionary_learning state dict)

SUBFOLDER may be nested (`saelens/transformer.h.1`). The folder is fetched by huggingface_hub's
`snapshot_download` with only that folder's files allowed, into its cache (HF_HUB_CACHE, else HF_HOME/hub);
HF_HUB_OFFLINE=1 reads the cache only, and HF_TOKEN or `hf auth login` reads private repos: all of that is
huggingface_hub's, nothing here talks HTTP. The folder is then read as any local one (sae/folder.py
`read_sae_files` tells the layouts apart by their files).

`Path("hf://o/r/x")` is `hf:/o/r/x` (pathlib collapses the double slash), so that form is taken too: a
caller that wrapped the argument in a Path still loads from the Hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (HfHubHTTPError, HfUriError, HFValidationError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.file_download import repo_folder_name

from .errors import MissingFileError, UsageError
from .folder import CONFIG_FILE, WEIGHTS_FILE
from .formats import dictionary_learning, saelens

HUB_PREFIX = "hf://"
FORMS = "hf://OWNER/REPO[/SUBFOLDER][@REVISION]"
"""The forms of a Hub path, for the messages that refuse one."""

ROOT_FILES = sorted({CONFIG_FILE, WEIGHTS_FILE, saelens.CONFIG_FILE, saelens.WEIGHTS_FILE,
                     dictionary_learning.CONFIG_FILE, dictionary_learning.WEIGHTS_FILE})
"""The files of every folder layout we read: what is fetched of a repo whose root is the SAE folder (not
the whole repo, which may hold many other SAEs)."""


@dataclass(frozen=True)
class HubPath:
    """A parsed Hub path: `subfolder` "" is the repo's root; `revision` None is the default branch."""

    repo_id: str
    subfolder: str = ""
    revision: str | None = None
    repo_type: str = "model"

    def __str__(self) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return (f"{HUB_PREFIX}{prefix}{self.repo_id}{'/' + self.subfolder if self.subfolder else ''}"
                f"{'@' + self.revision if self.revision else ''}")

    def allow_patterns(self) -> list[str]:
        """What `snapshot_download` fetches: the subfolder's files at any depth (or the subfolder itself when it
        names one file), or the layouts' files at the root."""
        return [self.subfolder, f"{self.subfolder}/*"] if self.subfolder else list(ROOT_FILES)


def is_hub_path(path: str | os.PathLike) -> bool:
    """Whether `path` names a Hub location (starts with hf://, or hf:/ as a pathlib.Path writes it)."""
    return str(path).startswith("hf:/")


def parse_hub_path(path: str | os.PathLike) -> HubPath:
    """The `HubPath` of an hf:// path (module docstring); a UsageError naming the path and the forms if it
    is malformed. Parsed by huggingface_hub's `parse_hf_uri`; a trailing @REVISION after the subfolder is
    taken off first (that form reads better beside a subfolder, and a folder name never holds an @)."""
    text = str(path)
    if not is_hub_path(text):
        raise UsageError(f"{text}: not a Hub path; expected {FORMS}")
    text = HUB_PREFIX + text[len("hf:/"):].lstrip("/")  # hf:/ (a Path's) and hf:// alike
    body, revision = text[len(HUB_PREFIX):].rstrip("/"), None
    if "@" in body.rpartition("/")[2] and body.count("/") >= 2:
        body, _, revision = body.rpartition("@")
    try:
        uri = huggingface_hub.parse_hf_uri(HUB_PREFIX + body.rstrip("/"))
    except (HfUriError, HFValidationError) as error:
        raise UsageError(f"{path}: {one_line(error)} (expected {FORMS})") from None
    if uri.type == "bucket":
        raise UsageError(f"{path}: a bucket holds no versioned SAE folders; expected {FORMS}")
    if revision is not None and uri.revision is not None:
        raise UsageError(f"{path}: two revisions ({uri.revision!r} and {revision!r}); name one")
    if revision == "":
        raise UsageError(f"{path}: empty revision after '@'; expected {FORMS}")
    return HubPath(uri.id, uri.path_in_repo, uri.revision or revision, uri.type)


def resolve_sae_path(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path of the SAE at `path`: for an hf:// path the folder (or file) in the Hugging Face cache,
    fetched first where it is not there (`download_sae`); any other path as it is, unchecked."""
    return download_sae(parse_hub_path(path), cache_dir) if is_hub_path(path) else Path(path)


def download_sae(hub: HubPath, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local copy of `hub`'s folder (or file), through huggingface_hub's `snapshot_download` into
    `cache_dir` (default huggingface_hub's own, read at call time). Every way it is not there is one line
    (MissingFileError) saying which of repo, revision or folder is missing, and for a cache miss offline,
    the cache folder and the command that fills it."""
    cache_dir = Path(cache_dir if cache_dir is not None else hub_constants.HF_HUB_CACHE)
    try:
        snapshot = huggingface_hub.snapshot_download(hub.repo_id, repo_type=hub.repo_type, revision=hub.revision,
                                                     cache_dir=cache_dir, allow_patterns=hub.allow_patterns())
    except RevisionNotFoundError:
        raise MissingFileError(f"{hub}: revision {hub.revision!r} not found in {hub.repo_id} on the Hub") from None
    except RepositoryNotFoundError:  # also a gated repo, and a private one read without a token
        raise MissingFileError(f"{hub}: repository {hub.repo_id} not found on the Hub (if it is private or gated, "
                               "log in with `hf auth login` or set HF_TOKEN)") from None
    except LocalEntryNotFoundError:  # offline (or the Hub unreachable) and not in the cache
        raise MissingFileError(cache_miss(hub, cache_dir)) from None
    except HfHubHTTPError as error:  # the Hub answered with an error of its own (down, rate limited)
        raise UsageError(f"{hub}: the Hub refused the download: {one_line(error)}") from None
    local = Path(snapshot) / hub.subfolder
    if not local.exists():
        raise MissingFileError(cache_miss(hub, cache_dir) if hub_constants.HF_HUB_OFFLINE
                               else f"{hub}: no files under '{hub.subfolder or '/'}' in {hub.repo_id} at revision "
                                    f"{hub.revision or 'main'} on the Hub (see {repo_url(hub)})")
    return local


def cache_miss(hub: HubPath, cache_dir: Path) -> str:
    """The message for `hub` missing from the cache with the Hub out of reach: where the cache is, and how
    to fill it."""
    folder = cache_dir / repo_folder_name(repo_id=hub.repo_id, repo_type=hub.repo_type)
    why = "HF_HUB_OFFLINE is set" if hub_constants.HF_HUB_OFFLINE else "the Hub could not be reached"
    what = f"'{hub.subfolder}'" if hub.subfolder else "the SAE files"
    return (f"{hub}: {what} at revision {hub.revision or 'main'} not in the Hugging Face cache {folder} and {why}; "
            f"fetch it once with network access: {fetch_command(hub)}")


def fetch_command(hub: HubPath) -> str:
    """The `hf download` command (huggingface_hub's CLI) that puts `hub` into the cache."""
    include = " ".join(f"--include '{pattern}'" for pattern in hub.allow_patterns())
    kind = f" --repo-type {hub.repo_type}" if hub.repo_type != "model" else ""
    revision = f" --revision {hub.revision}" if hub.revision else ""
    return f"hf download {hub.repo_id}{kind}{revision} {include}"


def repo_url(hub: HubPath) -> str:
    """The web page of `hub`'s repo at its revision."""
    return huggingface_hub.HfUri(hub.repo_type, hub.repo_id, hub.revision).to_url()


def one_line(error: BaseException) -> str:
    """An exception's message on one line (huggingface_hub's span several)."""
    return " ".join(str(error).split())
