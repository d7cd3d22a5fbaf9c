"""Where a model lives: the one resolver behind every loader and command (local directory or hub id).

`resolve_model_path(name_or_path, ...)` returns a local directory holding the files asked for. Rules, in order:

1. a name that is an existing directory is that directory (a local name is always local), unless it is a
   training checkpoint (meta.json and the optimizer state, no weights file): that is refused, naming the
   command that exports it;
2. an existing file is refused: a model is a directory;
3. a name that looks like a path (it starts with `.`, `/` or `~`, has more than one `/` or a backslash,
   or its first component is an existing directory, as in `runs/fnal` next to `runs/`) and does not exist
   is "no such directory", at once: the hub is never asked;
4. anything else is a Hugging Face hub id. Its files come from the hub cache or are downloaded into it.
   Unless downloads are off (HF_HUB_OFFLINE=1, local_files_only=True), whether the hub answers is probed
   once, for at most HUB_PROBE_SECONDS; when it does not, only the cache is used, and a file missing from
   it is "not in the local cache and the hub is unreachable (offline?)". Only an answer from the hub
   can say that a repository lacks a file.

Imports nothing of ours (config, tokenizer and checkpoint import it); huggingface_hub is imported only for
hub ids.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence, Union

HUB_PROBE_SECONDS = 2.0
_PROBE_TTL_SECONDS = 60.0  # one probe serves the loads of one command (tokenizer, config, weights)
_probes: dict[str, tuple[float, bool]] = {}

# a required file, or a tuple of alternatives: the first the repository has is taken
FileSpec = Union[str, Sequence[str]]


class ModelNotFoundError(FileNotFoundError):
    """A model name that resolves to nothing usable; the message says which rule failed."""


def looks_like_path(name: str) -> bool:
    """True for names a user means as a path (see rule 3 of the module docstring)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).is_dir()


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub endpoint answers within `timeout` seconds (any HTTP answer counts); cached a minute.

    The request runs in a daemon thread that is abandoned after `timeout`, so a hanging DNS lookup cannot
    stretch the wait.
    """
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    cached = _probes.get(endpoint)
    if cached is not None and time.monotonic() - cached[0] < _PROBE_TTL_SECONDS:
        return cached[1]
    answered: list[bool] = []

    def probe() -> None:
        try:
            from huggingface_hub import get_session

            get_session().head(endpoint, timeout=timeout)
            answered.append(True)
        except Exception:  # noqa: BLE001 -- DNS, refused, timeout, TLS, proxy: all mean "not reachable"
            answered.append(False)

    thread = threading.Thread(target=probe, name="neoxja-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    reachable = bool(answered and answered[0])
    _probes[endpoint] = (time.monotonic(), reachable)
    return reachable


def resolve_model_path(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    *,
    files: Iterable[FileSpec] = ("config.json",),
    optional: Iterable[str] = (),
    subfolder: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local directory of a model: `name_or_path` itself, or the hub cache's copy of a hub id.

    For a hub id, `files` (each a name, or a tuple of alternative names of which the first the repository
    has is taken) and, where the repository has them, `optional` are fetched; an index file
    (`*.index.json`) brings the shards its weight_map names. A local directory is returned as it is:
    the loaders check its contents and name what is missing. Errors are ModelNotFoundError
    (a FileNotFoundError) saying which rule failed.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "meta.json").is_file() and ((path / "state.pt").is_file() or (path / ".metadata").is_file()):
            raise ModelNotFoundError(
                f"{name} is a training checkpoint (model and optimizer state for --resume), not a model directory: "
                f"make one of it with `neoxja train export-checkpoint {name} OUT_DIR`, then use --model OUT_DIR")
        return path / subfolder if subfolder else path
    if path.exists():
        raise ModelNotFoundError(f"{name} is a file; a model is a directory (config.json, weights, tokenizer "
                                 "files) or a hub id")
    if looks_like_path(name):
        raise ModelNotFoundError(f"{name}: no such directory")

    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotFoundError(f"{name!r} is neither a local directory nor a valid hub id "
                                 "(namespace/name)") from None
    downloads_off = bool(local_files_only or constants.is_offline_mode())
    unreachable = not downloads_off and not hub_reachable()
    hub = _Hub(name, revision, cache_dir, subfolder, token, cache_only=downloads_off or unreachable,
               why=("the hub is unreachable (offline?)" if unreachable else
                    "downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True)"))
    found: list[Path] = []
    for spec in files:
        alternatives = [spec] if isinstance(spec, str) else list(spec)
        for i, filename in enumerate(alternatives):
            last = i == len(alternatives) - 1
            local = hub.fetch(filename, required=last and len(alternatives) == 1)
            if local is not None:
                found += [local, *hub.shards_of(local)]
                break
            if last:
                raise ModelNotFoundError(
                    f"{name!r}{hub.at}: none of {', '.join(alternatives)} is in the local cache and {hub.why}"
                    if hub.cache_only else f"the hub repository {name!r}{hub.at} has none of {', '.join(alternatives)}")
    for filename in optional:
        local = hub.fetch(filename, required=False)
        if local is not None:
            found.append(local)
    directories = {p.parent for p in found}
    if len(directories) != 1:  # cannot happen with huggingface_hub's cache: one snapshot per revision
        raise ModelNotFoundError(f"{name!r}{hub.at}: its files were not found in one directory: "
                                 f"{sorted(map(str, directories))}")
    return directories.pop()


class _Hub:
    """Per-file downloads of one repo id, with errors that say what was actually found out."""

    def __init__(self, repo_id, revision, cache_dir, subfolder, token, cache_only: bool, why: str):
        self.repo_id, self.revision, self.cache_dir = repo_id, revision, cache_dir
        self.subfolder, self.token, self.cache_only, self.why = subfolder, token, cache_only, why
        self.at = f" (revision {revision})" if revision else ""

    def fetch(self, filename: str, required: bool) -> Path | None:
        """The cached or downloaded file; None for a file the repository (or the cache, offline) lacks."""
        import huggingface_hub
        from huggingface_hub import errors

        try:
            return Path(huggingface_hub.hf_hub_download(
                self.repo_id, filename, subfolder=self.subfolder, revision=self.revision, cache_dir=self.cache_dir,
                local_files_only=self.cache_only, token=self.token))
        except errors.LocalEntryNotFoundError as e:
            if not required and self.cache_only:
                return None  # an optional file the cache lacks: the repository may lack it too
            why = self.why if self.cache_only else f"the download failed ({e})"
            raise ModelNotFoundError(f"{self.repo_id!r}{self.at}: {filename} is not in the local cache and "
                                     f"{why}") from None
        except errors.EntryNotFoundError:
            if required:
                raise ModelNotFoundError(f"the hub repository {self.repo_id!r}{self.at} has no file {filename}") \
                    from None
            return None
        except errors.RevisionNotFoundError:
            raise ModelNotFoundError(f"the hub repository {self.repo_id!r} has no revision {self.revision!r}") \
                from None
        except errors.GatedRepoError:
            raise ModelNotFoundError(f"{self.repo_id!r} is a gated repository: accept its terms on the hub and "
                                     "log in (`hf auth login`)") from None
        except errors.RepositoryNotFoundError:
            raise ModelNotFoundError(f"{self.repo_id!r} is neither a local directory nor a model on the hub "
                                     "(or it is private: log in with `hf auth login`)") from None

    def shards_of(self, local: Path) -> list[Path]:
        """The shards an index file names (a malformed index is left to the loader to report)."""
        if not local.name.endswith(".index.json"):
            return []
        try:
            shards = dict.fromkeys(json.loads(local.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []
        valid = [s for s in shards if isinstance(s, str) and "/" not in s and "\\" not in s and not s.startswith(".")]
        return [self.fetch(shard, required=True) for shard in valid]
