"""``condistill push RUN REPO_ID``: upload a run's export (and only the export) to the Hugging Face hub.

What goes up: ``condistill_config.json``, ``scheduler/``, the weight files named in the config
(with the rest of their component folder: ``config.json``, shards), ``README.md`` (the model
card; written first when the run has none) and ``samples.png``. Never ``checkpoints/``,
``logs/``, ``loss.jsonl``, ``data_report.json``, ``validation/``, optimizer state or locks.

The upload is one ``HfApi.create_commit`` after ``HfApi.create_repo(exist_ok=True)``:
huggingface_hub decides per file between a regular blob and its large-file path (Xet or LFS,
which it resumes itself). Everything the user can fix is a :class:`PushError` with a one-line
message, raised before any request where it can be known locally (not an export, offline
mode, no token).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["PushError", "export_folder", "export_files", "push_to_hub", "push_main"]


class PushError(RuntimeError):
    """A push that cannot be done; the message says why and what to do (one line)."""


def _files_under(folder: Path, root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and "/." not in p.relative_to(root).as_posix())


def export_folder(run: str | os.PathLike) -> Path:
    """The export folder of ``run``: ``RUN/adapter`` (or ``RUN`` itself for an export folder and for runs
    written before exports moved there).

    Raises:
        PushError: ``run`` holds no ``condistill_config.json``.
    """
    from condistill.adapters.save_load import CONFIG_NAME, find_adapter_dir

    try:
        return find_adapter_dir(Path(run))
    except FileNotFoundError:
        raise PushError(f"{run} is not an adapter export (no {CONFIG_NAME}); push the run folder that "
                        "`condistill train` wrote") from None


def export_files(run: str | os.PathLike) -> list[str]:
    """The paths (relative, posix, sorted) of ``run``'s export that a push uploads.

    Raises:
        PushError: ``run`` is not an export (no readable ``condistill_config.json``, a weight
            file missing).
    """
    from condistill.adapters.save_load import CONFIG_NAME, SCHEDULER_SUBFOLDER, read_adapter_config

    from .card import CARD_NAME, SAMPLES_NAME

    from condistill.adapters.config_checks import verify_checksums

    run = export_folder(run)
    try:
        config = read_adapter_config(run)
        verify_checksums(config, run, stacklevel=3)  # a damaged or edited file never goes up
    except (OSError, ValueError) as error:
        raise PushError(f"{run} is not a usable adapter export: {error}") from error
    files = {CONFIG_NAME}
    if (run / SCHEDULER_SUBFOLDER).is_dir():
        files.update(_files_under(run / SCHEDULER_SUBFOLDER, run))
    for component, rel in config["weight_files"].items():
        path = run / rel
        if not path.is_file():
            raise PushError(f"{run} is not a complete adapter export: the {component} weights {rel} are missing")
        parent = Path(rel).parent
        if parent != Path("."):  # a component folder: its config.json and every shard travel with it
            files.update(_files_under(run / parent, run))
        else:
            files.add(Path(rel).as_posix())
    for name in (CARD_NAME, SAMPLES_NAME):
        if (run / name).is_file():
            files.add(name)
    return sorted(files)


def _offline() -> bool:
    from condistill.hub import hub_offline

    return hub_offline()


def _http_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def push_to_hub(run: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, commit_message: str | None = None, endpoint: str | None = None,
                log: Callable[[str], None] | None = None) -> str:
    """Create ``repo_id`` (if needed) and upload ``run``'s export to it in one commit; return the commit URL.

    Args:
        run: the run folder (its export in ``adapter/``), or an export folder.
        repo_id: ``org/name`` of a model repository.
        private: create the repository private (an existing one keeps its visibility).
        revision: branch to commit to (created from main when missing); default main.
        token: a hub token with write access; default ``HF_TOKEN`` or the token of ``hf auth login``.
        commit_message: default "Upload condistill <kind> adapter (<condition>, <steps> steps)".
        endpoint: the hub URL (default huggingface_hub's, i.e. ``HF_ENDPOINT``).
        log: called with progress lines.

    Raises:
        PushError: not an export, offline mode, no token, no permission, or the hub refused it.
    """
    import json

    from .card import CARD_NAME, set_card_source, write_model_card

    run = export_folder(run)
    files = export_files(run)
    if _offline():
        raise PushError("the Hugging Face hub is in offline mode (HF_HUB_OFFLINE=1): unset it to push")
    import huggingface_hub
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    token = token or os.environ.get("HF_TOKEN") or huggingface_hub.get_token()
    if not token:
        raise PushError("no Hugging Face token: run `hf auth login`, pass --token, or set HF_TOKEN")
    if CARD_NAME not in files:  # an export from before model cards: write its card now
        write_model_card(run)
        files = export_files(run)
    config = json.loads((run / "condistill_config.json").read_text())
    message = commit_message or (f"Upload condistill {config['kind']} adapter ({config['condition_name']}, "
                                 f"{(config.get('extra') or {}).get('steps_trained', '?')} steps)")
    operations = []
    for rel in files:
        if rel == CARD_NAME:  # the card's usage snippets name the repo, not the local run folder
            card = set_card_source((run / rel).read_text(encoding="utf-8"), repo_id)
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=card.encode("utf-8")))
        else:
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(run / rel)))
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        if log is not None:
            log(f"uploading {len(files)} files of {run} to {repo_id}" + (f"@{revision}" if revision else ""))
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision, repo_type="model")
    except HfHubHTTPError as error:
        status = _http_status(error)
        if status in (401, 403):
            raise PushError(f"no permission to write to {repo_id} (HTTP {status} from the hub): use a token with "
                            "write access to that namespace (`hf auth login` or --token / HF_TOKEN)") from error
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PushError(f"the hub refused the push to {repo_id} (HTTP {status}): {first}") from error
    except (OSError, ValueError, RuntimeError) as error:
        cause = error.__cause__ or error
        raise PushError(f"pushing to {repo_id} failed: {type(cause).__name__}: "
                        f"{(str(cause).strip().splitlines() or [''])[0]}") from error
    except Exception as error:  # noqa: BLE001 - httpx transport errors (no connection, timeout)
        if type(error).__module__.startswith(("httpx", "httpcore")):
            raise PushError(f"could not reach the hub at {api.endpoint} to push {repo_id}: "
                            f"{type(error).__name__}: {error}") from error
        raise
    return str(info.commit_url)


def push_main(argv: list[str]) -> int:
    """``condistill push RUN REPO_ID [options]``: 0 when pushed; a :class:`PushError` prints one line and gives 1."""
    import sys

    from condistill.cli_parsing import CommandParser

    parser = CommandParser(
        prog="condistill push", description="Upload a run's export (adapter files, scheduler, model card, samples) "
        "to a Hugging Face model repository, created if missing. Checkpoints, logs and validation grids stay local.")
    parser.add_argument("run", help="the run folder (the export at its root)")
    parser.add_argument("repo_id", help="org/name of the model repository")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to commit to (created when missing) [main]")
    parser.add_argument("--token", help="hub token with write access [HF_TOKEN, else the `hf auth login` token]")
    parser.add_argument("--commit-message", help="the commit message [Upload condistill <kind> adapter ...]")
    args = parser.parse_args(argv)
    try:
        url = push_to_hub(args.run, args.repo_id, private=args.private, revision=args.revision, token=args.token,
                          commit_message=args.commit_message, log=lambda msg: print(f"condistill push: {msg}",
                                                                                    file=sys.stderr))
    except PushError as error:
        print(f"condistill push: error: {error}", file=sys.stderr)
        return 1
    print(url)
    return 0
