"""Resolve an identifier to a local folder, and vet the weights it holds.

Identifiers, tried in this order:
1. a zoo alias (``minilm``, ``smollm2``, ``sentiment-demo``): built on first use;
2. an existing local folder;
3. a hub id (``org/name``) that is already in the local Hugging Face cache, at the pinned
   ``revision`` if one is given. Nothing is downloaded unless ``allow_download`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sureserve.errors import ModelSourceError, UnsafeWeightsError
from sureserve.settings import Settings
from sureserve.zoo.registry import ZOO

SAFE_WEIGHTS = (".safetensors",)
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Source:
    identifier: str
    kind: str  # "zoo" | "local" | "hub-cache" | "hub-download"
    path: Path
    revision: str | None = None


def resolve(
    identifier: str,
    revision: str | None = None,
    settings: Settings | None = None,
    *,
    need_config: bool = True,
) -> Source:
    """Resolve ``identifier``; ``need_config=False`` accepts tokenizer-only folders."""
    settings = settings or Settings()
    if identifier in ZOO:
        if revision is not None:
            raise ModelSourceError(
                f"revision {revision!r} was given for the zoo alias {identifier!r}",
                "zoo aliases have no revisions; drop --revision",
            )
        return Source(identifier, "zoo", ZOO[identifier].path(settings))
    local = Path(identifier).expanduser()
    if local.is_dir():
        if need_config and not (local / "config.json").is_file():
            raise ModelSourceError(
                f"the folder {local} has no config.json, so it is not a model folder",
                "point at the folder that holds config.json and the weights",
            )
        return Source(identifier, "local", local.resolve(), revision)
    if _looks_like_hub_id(identifier):
        return _from_hub(identifier, revision, settings)
    raise ModelSourceError(
        f"{identifier!r} is not a zoo alias, an existing folder or a hub id (org/name)",
        f"use one of {', '.join(sorted(ZOO))} (see `sureserve models`), a path to a model "
        "folder, or a hub id already in your Hugging Face cache",
    )


def _looks_like_hub_id(identifier: str) -> bool:
    parts = identifier.split("/")
    return len(parts) == 2 and all(parts) and not identifier.startswith((".", "~"))


def _from_hub(repo_id: str, revision: str | None, settings: Settings) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = not settings.allow_download
    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=offline)
    except LocalEntryNotFoundError as exc:
        at = f" at revision {revision}" if revision else ""
        raise ModelSourceError(
            f"{repo_id}{at} is not in the local Hugging Face cache and downloads are off",
            f"fetch it on a machine with access (`hf download {repo_id}"
            + (f" --revision {revision}" if revision else "")
            + "`), pass a local folder, or set SURESERVE_ALLOW_DOWNLOAD=1",
        ) from exc
    except HFValidationError as exc:
        raise ModelSourceError(f"{repo_id!r} is not a valid hub id: {exc}",
                               "hub ids look like org/name") from exc
    except Exception as exc:  # network, auth, missing revision when online
        raise ModelSourceError(f"could not get {repo_id} from the hub: {exc}",
                               "check the id, the revision and your network") from exc
    return Source(repo_id, "hub-download" if not offline else "hub-cache", Path(path), revision)


def weight_files(path: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickled files) directly inside ``path``."""
    files = [p for p in sorted(path.iterdir()) if p.is_file()]
    safe = [p for p in files if p.name.endswith(SAFE_WEIGHTS)]
    pickled = [p for p in files
               if p.name.endswith(PICKLED_WEIGHTS) and "training_args" not in p.name]
    return safe, pickled


def vet_weights(path: Path, allow_pickle: bool) -> bool:
    """Decide the weight format; returns ``use_safetensors``. Refuses pickles unless allowed."""
    safe, pickled = weight_files(path)
    if safe:
        return True
    if pickled:
        if not allow_pickle:
            names = ", ".join(p.name for p in pickled)
            raise UnsafeWeightsError(
                f"{path} holds only pickled weights ({names}); loading them would run "
                "whatever code the file contains, because unpickling executes code",
                "convert them to safetensors (safetensors' convert script), or if you trust "
                "the file's origin, opt in with --allow-pickle / SURESERVE_ALLOW_PICKLE=1",
            )
        return False
    raise ModelSourceError(
        f"{path} has no weight files (*.safetensors, or pickled *.bin)",
        "point at a complete model folder",
    )
