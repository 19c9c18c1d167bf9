"""Sweep folders on local disk or behind a URI (``s3://``, ``gs://``, ``file://``).

Tune keeps checkpoints wherever the spec's ``storage`` says; the driver must read its own
state file and the checkpoints back from the same place. Paths without ``://`` are local;
URIs go through pyarrow's file systems (the ones Tune itself uses), and keep their query
(``?region=...``, ``?endpoint_override=...``) when joined.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def is_uri(location: str) -> bool:
    """Whether ``location`` names a URI rather than a local path."""
    return "://" in location


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (parts go before the URI's query)."""
    if not is_uri(base):
        return str(Path(base, *parts))
    split = urlsplit(base)
    path = "/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit(split._replace(path=path))


def _fs(location: str) -> tuple[Any, str]:
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def exists(location: str) -> bool:
    """Whether a file or folder exists at ``location``."""
    import pyarrow.fs

    fs, path = _fs(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_text(location: str) -> str:
    """The UTF-8 text of the file at ``location``."""
    fs, path = _fs(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(location: str, text: str) -> None:
    """Write ``text`` to ``location`` whole: a reader sees the old file or the new one."""
    if not is_uri(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(target)
        return
    fs, path = _fs(location)
    fs.create_dir(str(PurePosixPath(path).parent), recursive=True)
    with fs.open_output_stream(path) as f:  # object stores publish on close
        f.write(text.encode("utf-8"))


def subfolders(location: str) -> list[str]:
    """Names of the folders directly under ``location`` (none if it does not exist)."""
    import pyarrow.fs

    fs, path = _fs(location)
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False)
    infos = fs.get_file_info(selector)
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)


def checkpoint_location(checkpoint_path: str, sweep_dir: str) -> str:
    """Where a Tune checkpoint of the sweep in ``sweep_dir`` lives, readable by `local_copy`.

    Tune gives checkpoint paths inside its file system, without the scheme or the query of
    the storage URI; under a URI sweep folder the checkpoint is ``<sweep>/<trial>/<name>``.
    """
    if not is_uri(sweep_dir):
        return checkpoint_path
    trial_dir, name = PurePosixPath(checkpoint_path).parts[-2:]
    return join(sweep_dir, trial_dir, name)


@contextlib.contextmanager
def local_copy(location: str) -> Iterator[str]:
    """A local folder holding the files at ``location`` (downloaded for a URI, then removed)."""
    if not is_uri(location):
        yield location
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="hessweep-ckpt-") as tmp:
        if not exists(location):
            raise FileNotFoundError(f"nothing at {location}")
        pyarrow.fs.copy_files(location, tmp)
        yield tmp
