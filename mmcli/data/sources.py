"""Readers of image–text pair sources: CSV/TSV, JSONL, a folder of captioned images, and
webdataset shards.

Map-style sources (everything but webdataset) are read whole into :class:`Record` lists; image
files are not opened here, so a broken image is found (and skipped) only when it is decoded.
Webdataset sources are streamed by :mod:`mmcli.data.batches`; here they only resolve to URLs.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from mmcli.data.images import is_image_file
from mmcli.errors import MmcliError
from mmcli.io import SUFFIX_FORMATS
from mmcli.spec import SourceSpec, url_scheme

log = logging.getLogger(__name__)

# The shapes dataset's JSONL names its fields after what they are, not open_clip's CSV columns.
_FALLBACK_KEYS = {"image_key": "image", "text_key": "caption"}


@dataclass(frozen=True)
class Record:
    """One image–text pair: the absolute image path, the caption and the source row/object."""

    image: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class FolderScan:
    """What a folder source holds: the captioned images and the images lacking a caption."""

    records: list[Record]
    uncaptioned: list[str]


# --------------------------------------------------------------------------------------------
# format resolution
# --------------------------------------------------------------------------------------------


def _is_shard_pattern(path: str) -> bool:
    return "{" in path and "}" in path


def _is_remote(url: str) -> bool:
    # What webdataset's gopen does not open as a plain path: file: URLs and every other scheme.
    return url_scheme(url) != ""


def source_format(spec: SourceSpec) -> str:
    """The format of ``spec``: its ``format`` field, or for ``auto`` the one its path implies."""
    if spec.format != "auto":
        return spec.format
    if _is_shard_pattern(spec.path) or _is_remote(spec.path):
        return "webdataset"
    path = Path(spec.path).expanduser()
    if path.is_dir():
        return "webdataset" if any(path.glob("*.tar")) else "folder"
    if not path.exists():
        raise MmcliError(f"{spec.path}: no such file or folder")
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MmcliError(
            f"{spec.path}: cannot tell the format from the suffix {path.suffix!r}; "
            "set format to csv, tsv, jsonl, folder or webdataset"
        )
    return fmt


def webdataset_urls(spec: SourceSpec) -> list[str]:
    """The shard URLs of a webdataset source: a brace pattern expanded, the ``.tar`` files of a
    folder (sorted), or one tar. Local shards must exist."""
    if _is_shard_pattern(spec.path):
        urls = list(braceexpand(spec.path))
    elif _is_remote(spec.path):
        urls = [spec.path]
    elif Path(spec.path).expanduser().is_dir():
        urls = sorted(str(p) for p in Path(spec.path).expanduser().glob("*.tar"))
    else:
        urls = [str(Path(spec.path).expanduser())]
    if not spec.allow_commands:
        # The spec refuses these too; this guards callers that build a SourceSpec without validation.
        commands = [u for u in urls if url_scheme(u) not in ("", "file")]
        if commands:
            raise MmcliError(
                f"{spec.path}: {commands[0][:80]!r} is opened by running a program "
                f"(scheme {url_scheme(commands[0])!r}); set allow_commands: true on the source to allow it"
            )
    missing = [u for u in urls if not _is_remote(u) and not Path(u).expanduser().is_file()]
    if not urls:
        raise MmcliError(f"{spec.path}: no .tar shards found")
    if missing:
        raise MmcliError(f"{spec.path}: {len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")
    return urls


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def read_records(spec: SourceSpec) -> list[Record]:
    """All image–text pairs of a map-style source (csv, tsv, jsonl or folder)."""
    fmt = source_format(spec)
    if fmt == "webdataset":
        raise MmcliError(f"{spec.path}: a webdataset source is streamed, not read as a list of records")
    path = Path(spec.path).expanduser()
    if fmt == "folder":
        records = _read_folder(path)
    else:
        if not path.is_file():
            raise MmcliError(f"{spec.path}: no such file")
        if fmt == "jsonl":
            records = read_jsonl(path, spec.image_key, spec.text_key)
        else:
            separator = spec.separator or ("\t" if fmt == "tsv" else ",")
            records = read_table(path, separator, spec.image_key, spec.text_key)
    if not records:
        raise MmcliError(f"{spec.path}: no image–text pairs found")
    _check_first_image(spec.path, records[0])
    return records


def _check_first_image(source: str, record: Record) -> None:
    # Wrong relative paths would otherwise show up only as every image being skipped.
    if not Path(record.image).exists():
        raise MmcliError(
            f"{source}: image {record.image} of the first record not found "
            "(relative paths are resolved against the source file's folder)"
        )


def _absolute(image: str, base: Path) -> str:
    return os.path.abspath(base / Path(image).expanduser())


def read_table(path: Path, separator: str, image_key: str, text_key: str) -> list[Record]:
    """Records of a CSV/TSV file with a header row; quoted fields are handled by :mod:`csv`."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        for key, what in ((image_key, "image_key"), (text_key, "text_key")):
            if key not in columns:
                raise MmcliError(f"{path}: no column {key!r} ({what}); the columns are: {', '.join(columns) or 'none'}")
        try:
            return [_table_record(path, reader.line_num, row, image_key, text_key) for row in reader]
        except csv.Error as exc:
            raise MmcliError(f"{path}: line {reader.line_num}: {exc}") from None


def _table_record(path: Path, line: int, row: dict, image_key: str, text_key: str) -> Record:
    image, text = row.get(image_key), row.get(text_key)
    if not image or text is None:
        raise MmcliError(f"{path}: line {line}: empty {image_key!r} or missing {text_key!r}")
    return Record(_absolute(image, path.parent), text, dict(row))


def read_jsonl(path: Path, image_key: str, text_key: str) -> list[Record]:
    """Records of a JSONL file; ``image``/``caption`` are used when the keys are absent."""
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                records.append(_jsonl_record(path, number, line, image_key, text_key))
    return records


def _jsonl_record(path: Path, number: int, line: str, image_key: str, text_key: str) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MmcliError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise MmcliError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
    image = _field(path, number, obj, image_key, _FALLBACK_KEYS["image_key"])
    text = _field(path, number, obj, text_key, _FALLBACK_KEYS["text_key"])
    return Record(_absolute(image, path.parent), text, obj)


def _field(path: Path, number: int, obj: dict, key: str, fallback: str) -> str:
    name = key if key in obj else fallback if fallback in obj else None
    if name is None:
        raise MmcliError(f"{path}: line {number}: no key {key!r}; the keys are: {', '.join(obj) or 'none'}")
    value = obj[name]
    if not isinstance(value, str):
        raise MmcliError(f"{path}: line {number}: {name!r} must be a string, not {type(value).__name__}")
    return value


def scan_folder(root: Path) -> FolderScan:
    """Images under ``root`` (recursively, sorted) paired with a same-name ``.txt`` caption;
    images without a (non-empty) caption are listed apart."""
    records, uncaptioned = [], []
    for path in sorted(p for p in root.rglob("*") if is_image_file(p) and p.is_file()):
        caption_file = path.with_suffix(".txt")
        text = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        if text:
            relative = path.relative_to(root).as_posix()
            records.append(Record(os.path.abspath(path), text, {"image": relative, "caption": text}))
        else:
            uncaptioned.append(str(path))
    return FolderScan(records, uncaptioned)


def _read_folder(root: Path) -> list[Record]:
    if not root.is_dir():
        raise MmcliError(f"{root}: no such folder")
    scan = scan_folder(root)
    if not scan.records and scan.uncaptioned:
        raise MmcliError(f"{root}: {len(scan.uncaptioned)} images but none has a same-name .txt caption")
    if scan.uncaptioned:
        log.warning("%s: skipped %d images without a .txt caption", root, len(scan.uncaptioned))
    return scan.records


# --------------------------------------------------------------------------------------------
# webdataset size
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def count_shard_samples(urls: tuple[str, ...], image_extensions: tuple[str, ...]) -> int:
    """Number of samples (keys with an image member) in local tar shards; read once per list.

    Only member headers are read, not their contents."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    total = 0
    for url in urls:
        if _is_remote(url):
            raise MmcliError(f"{url}: cannot count samples of remote shards; set the source's size")
        try:
            with tarfile.open(url) as tar:
                names = [m.name for m in tar if m.isfile()]
            keys = {base_plus_ext(name)[0] for name in names if _has_suffix(name, image_extensions)}
        except (OSError, tarfile.TarError) as exc:
            raise MmcliError(f"{url}: not a readable tar file ({exc})") from None
        total += len(keys)
    return total


def _has_suffix(name: str, extensions: tuple[str, ...]) -> bool:
    return any(name.lower().endswith("." + ext) for ext in extensions)
