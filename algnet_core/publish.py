"""Upload an exported model folder to the Hugging Face Hub (``algnet publish DIR --repo-id ID``).

The folder must hold ``config.json``, ``model.safetensors`` and a ``README.md`` model card with an
evaluation table (as :mod:`train.export` writes it). ``--dry-run`` prints the exact files that would be
uploaded (size, SHA-256) and the card, and touches no network. The upload is one
``HfApi.create_repo(exist_ok=True)`` plus one ``HfApi.upload_folder`` restricted to exactly those files.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REQUIRED_FILES = ("config.json", "model.safetensors", "README.md")
TABLE_HEADER = "| benchmark |"


def publish_files(folder: str | Path) -> list[Path]:
    """The files to upload: every visible regular file at the top of ``folder``, checked for completeness.

    Raises ``FileNotFoundError`` for a missing required file and ``ValueError`` for a card without an
    evaluation table.
    """
    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: export it with `python -m train.export`")
    if TABLE_HEADER not in (folder / "README.md").read_text():
        raise ValueError(f"{folder / 'README.md'} has no evaluation table ({TABLE_HEADER!r} ...)")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def describe(folder: str | Path, repo_id: str) -> str:
    """The dry-run report: destination, the exact file list with sizes and hashes, then the card."""
    files = publish_files(folder)
    lines = [f"would upload to https://huggingface.co/{repo_id} ({len(files)} files):"]
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        lines.append(f"  {path.name}  {path.stat().st_size} bytes  sha256 {digest}")
    lines += ["", "--- README.md (model card) ---", (Path(folder) / "README.md").read_text()]
    return "\n".join(lines)


def publish(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload ALGNet model",
    api: Any = None,
) -> Any:
    """Create ``repo_id`` if needed and upload the folder's files; returns ``upload_folder``'s result.

    ``api`` defaults to ``huggingface_hub.HfApi(token=token)`` (tests pass a stand-in).
    """
    files = publish_files(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message,
        allow_patterns=[glob.escape(p.name) for p in files],  # patterns: a name with [ ] is meant as is
    )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``publish`` arguments (DIR, --repo-id, --dry-run, --private, --token, --message)."""
    parser.add_argument("dir", help="exported folder (config.json, model.safetensors, README.md)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, e.g. user/algnet-s-motion")
    parser.add_argument("--dry-run", action="store_true", help="list the files and the card, upload nothing")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")
    parser.add_argument("--message", default="Upload ALGNet model", help="commit message")
    return parser


def run(args: argparse.Namespace, api: Any = None) -> int:
    """Execute parsed ``publish`` arguments; returns the exit status."""
    if args.dry_run:
        print(describe(args.dir, args.repo_id))
        return 0
    result = publish(
        args.dir, args.repo_id, private=args.private, token=args.token, commit_message=args.message, api=api
    )
    print(f"uploaded {args.dir} to https://huggingface.co/{args.repo_id}: {result}")
    return 0


def main(argv: Sequence[str] | None = None, api: Any = None) -> int:
    """``python -m algnet_core.publish DIR --repo-id ID [--dry-run]`` (also ``algnet publish``)."""
    parser = add_arguments(argparse.ArgumentParser(prog="algnet publish", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv), api=api)


if __name__ == "__main__":
    raise SystemExit(main())
