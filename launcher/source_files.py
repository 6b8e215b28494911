"""The files a data source names, with their sizes; nothing is read.

A source is a local file, a directory (its data files, recursively, sorted), a glob pattern, an
s3:// / gs:// / file:// URI (one object, or everything below a prefix) or an `hf:` split (the
`datasets` cache files that hold it, launcher.hf_files). The streamed path (launcher.stream_data)
cuts these files into pieces; the prepared-data fingerprint (launcher.prepared) records them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.hf_files import HubSplit, resolve_split
from launcher.records import (
    FILE_SUFFIXES,
    DataError,
    check_suffix,
    data_files,
    glob_files,
    is_glob,
    local_path,
    not_found,
)


@dataclass(frozen=True)
class SourceFile:
    path: str
    rel: str
    """The path relative to the source (part of every streamed row's key)."""
    size: int


def is_remote(spec: str) -> bool:
    """A URI other than file://: only Ray Data tasks read it."""
    return "://" in spec and not spec.startswith("file://")


def list_files(
    spec: str, base_dir: Path | None = None, hub: dict[str, HubSplit] | None = None
) -> list[SourceFile] | None:
    """The data files of one source with their sizes. An `hf:` split is taken from `hub` when
    already resolved there (hf_files.resolve_split); None when its files hold more than the
    split, which only the driver path reads."""
    if spec.startswith("hf:"):
        split = (hub or {}).get(spec) or resolve_split(spec)
        return [SourceFile(f.path, f.name, f.size) for f in split.files] if split.whole else None
    if is_remote(spec):
        return _list_uri(spec)
    path = local_path(spec, base_dir)
    if is_glob(str(path)):
        root = _glob_root(path)
        found = glob_files(path)
    elif not path.exists():
        raise not_found(spec, path, base_dir)
    elif path.is_dir():
        root, found = path, data_files(path)
    else:
        check_suffix(path)
        root, found = path.parent, [path]
    return [SourceFile(str(p), str(p.relative_to(root)), p.stat().st_size) for p in found]


def _glob_root(pattern: Path) -> Path:
    parts = []
    for part in pattern.parts:
        if is_glob(part):
            break
        parts.append(part)
    return Path(*parts)


def uri_files(uri: str) -> tuple[str, list]:
    """The files under a URI (one object, or everything below a prefix) as pyarrow FileInfo
    objects, with the root path they were listed from. Raises what the filesystem raises."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    else:
        infos = [info]
    return root, sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def _list_uri(uri: str) -> list[SourceFile]:
    try:
        root, infos = uri_files(uri)
    except Exception as exc:
        raise DataError(f"{uri}: cannot list: {exc}") from None
    scheme = uri.split("://", 1)[0]
    out = []
    for i in infos:
        rel = i.path[len(root) :].lstrip("/") or Path(i.path).name
        if Path(i.path).suffix.lower() not in FILE_SUFFIXES or any(
            part.startswith(".") for part in Path(rel).parts
        ):
            continue
        out.append(SourceFile(f"{scheme}://{i.path}", rel, i.size))
    if not out:
        raise DataError(f"{uri}: no data files found")
    return out
