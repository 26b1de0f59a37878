"""Where models live: local folders, the embedded assets, and hub ids in the local cache.

One rule resolves the model references condistill reads (base, adapter; the judge's packaged
folder too):

1. an existing local folder is used as it is;
2. ``embedded:<name>`` is the folder ``<name>`` shipped inside the package
   (``condistill/assets/<name>``: ``tiny-teacher`` and ``judge``), so an installed wheel finds
   its own default from any working directory. The names ``data/tiny-teacher`` and
   ``data/judge``, which adapters exported before the assets moved into the package recorded,
   mean the same folders when no such local folder exists;
3. anything else that looks like ``org/name`` is a hub repo id, read from the local Hugging Face
   cache and downloaded only when the hub is not in offline mode.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ASSETS_DIR", "EMBEDDED_PREFIX", "embedded_path", "hub_cache_dir", "hub_offline", "looks_like_repo_id",
           "resolve_pretrained_dir"]

#: The package's own model folders (package data).
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_PREFIX = "embedded:"
#: Names recorded by adapters exported while the assets lived in the repository's ``data/``.
_LEGACY_NAMES = {"data/tiny-teacher": "tiny-teacher", "data/judge": "judge"}


def embedded_path(name: str | os.PathLike) -> Path | None:
    """The packaged folder that ``name`` denotes (``embedded:<name>`` or a legacy ``data/<name>``
    that is not a local folder), else ``None``.

    Raises:
        FileNotFoundError: ``embedded:<name>`` names no packaged folder; the message lists them.
    """
    text = os.fspath(name)
    if text.startswith(EMBEDDED_PREFIX):
        folder = ASSETS_DIR / text[len(EMBEDDED_PREFIX):]
        if not folder.is_dir() or not text[len(EMBEDDED_PREFIX):]:
            known = sorted(p.name for p in ASSETS_DIR.iterdir() if p.is_dir()) if ASSETS_DIR.is_dir() else []
            raise FileNotFoundError(
                f"{text!r} is not an embedded model; the package ships {[EMBEDDED_PREFIX + k for k in known]}."
            )
        return folder
    legacy = _LEGACY_NAMES.get(text.rstrip("/"))
    if legacy and not Path(text).is_dir():
        return ASSETS_DIR / legacy
    return None



def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Offline mode, read from the environment at call time (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """The hub cache folder, read from the environment at call time."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def looks_like_repo_id(name: str) -> bool:
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1:
        return False
    org, repo = name.split("/")
    return bool(org) and bool(repo)


def resolve_pretrained_dir(name_or_path: str | os.PathLike, revision: str | None = None, what: str = "model") -> Path:
    """Return a local folder for ``name_or_path``: the folder itself, or a hub snapshot.

    A local folder is used as is; ``embedded:<name>`` is a packaged folder (module docstring).
    Otherwise ``name_or_path`` must look like a hub repo id
    (``"org/name"``); it is first looked up in the local Hugging Face cache (``HF_HUB_CACHE``,
    else ``HF_HOME/hub``, read at call time), and downloaded with
    ``huggingface_hub.snapshot_download`` only when the hub is not in offline mode
    (``HF_HUB_OFFLINE=1`` forbids downloads).

    Args:
        name_or_path: a local folder or a hub repo id.
        revision: branch, tag or commit of the hub repo (ignored for local folders).
        what: what is being loaded, for the error message ("base model", "adapter").

    Raises:
        FileNotFoundError: when neither a local folder nor a cached / downloadable repo is found;
            the message says how to pass a local path.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    embedded = embedded_path(name)
    if embedded is not None:
        return embedded
    if path.exists():
        raise FileNotFoundError(
            f"The {what} {name!r} is a file, not a folder. Pass the folder that contains it "
            "(a diffusers folder with model_index.json / config files)."
        )
    hint = (
        f"Pass the path of a local folder, or a hub repo id ('org/name') that is in the local "
        f"Hugging Face cache ({hub_cache_dir()}); download it beforehand with "
        f"`hf download <repo_id>` on a machine with internet access and set "
        f"HF_HOME/HF_HUB_CACHE to that cache."
    )
    if not looks_like_repo_id(name):
        raise FileNotFoundError(f"The {what} {name!r} is not an existing local folder. {hint}")

    from huggingface_hub import snapshot_download

    cache_dir = hub_cache_dir()
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except Exception as cached_error:  # noqa: BLE001 - any failure means "not cached"
        if hub_offline():
            raise FileNotFoundError(
                f"The {what} {name!r} is neither a local folder nor in the Hugging Face cache "
                f"{cache_dir!r} (revision {revision or 'main'}), and HF_HUB_OFFLINE=1 forbids "
                f"downloading it. {hint}"
            ) from cached_error
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir))
    except Exception as error:  # noqa: BLE001
        raise FileNotFoundError(
            f"The {what} {name!r} is not a local folder and could not be downloaded from the "
            f"Hugging Face hub ({type(error).__name__}: {error}). {hint}"
        ) from error
