"""Caption images with a CoCa run (Yu et al. 2022) into a JSON-lines file that an interrupted run resumes.

``mmcli caption PATH --model RUN --out captions.jsonl`` reads what ``mmcli embed`` reads (an image
folder, a CSV/TSV/JSONL dataset file, webdataset shards, with the same loaders) and also a single
image file, decodes each batch with :class:`~mmcli.models.captioning.CaptionDecoder` and streams
one row a line: ``{"item": key, "caption": text, "score": mean token log-probability}``.

The files of ``--out captions.jsonl``; under torchrun rank r of W writes
``captions.rank0000r-of-0000W.jsonl`` (:func:`output_path`) and the same companions of that name:

- ``captions.jsonl.partial``: the rows so far, appended and flushed as each batch finishes;
- ``captions.jsonl.partial.json``: the job (everything that decides the rows), the sidecar fields
  and the items skipped so far; written before the first row;
- ``captions.jsonl.lock``: held by the one writer (:class:`mmcli.io.FileLock`, as embed's);
- ``captions.jsonl``: the rows, only once every item is done (the partial file renamed), so a
  file of that name is always complete;
- ``captions.jsonl.meta.json``: the sidecar: model (ref, arch, checksum), decoding settings, image
  decoding, input, counts and the skipped items with their reasons.

Rows are in input order. Ranks take contiguous shares of a listed input (a folder, a dataset
file), so their shards concatenated in rank order are the file of a single-process run:
``cat captions.rank*-of-00008.jsonl > captions.jsonl`` (each shard's skipped items are in its own
sidecar). Webdataset shards are dealt to ranks one by one: the same rows, in another order.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcli.errors import MmcliError
from mmcli.io import DEFAULT_IMAGE_KEY, FileLock, atomic_write_json, created_stamp
from mmcli.retrieval.index import shard_name

FORMAT = "mmcli-captions"
VERSION = 1
SUFFIX = ".jsonl"
FIRST_ROWS = 10
"""Rows of the output shown in the summary."""


# --------------------------------------------------------------------------------------------
# file names
# --------------------------------------------------------------------------------------------


def output_path(out: str, rank: int = 0, world: int = 1) -> str:
    """The file this rank writes: ``out`` itself, or its shard under torchrun (named as an index's
    shards: ``captions.jsonl`` → ``captions.rank00001-of-00004.jsonl``)."""
    out = os.fspath(out)
    if not out.endswith(SUFFIX) or out == SUFFIX:
        raise MmcliError(f"--out {out}: the captions file name must end with {SUFFIX}")
    return shard_name(out, rank, world, suffix=SUFFIX) if world > 1 else out


def other_layouts(out: str, target: str) -> list[str]:
    """Complete outputs for ``out`` in the other layout than ``target``: the single file beside
    torchrun shards, or the shards (of any world size but ``target``'s) beside a single file."""
    import glob

    stem = out[: len(out) - len(SUFFIX)]
    shards = sorted(glob.glob(glob.escape(stem) + ".rank*-of-*" + SUFFIX))
    if target == out:
        return shards
    world = target[len(stem) :].split("-of-")[1]
    return [p for p in ([out] if os.path.exists(out) else []) + shards if not p.endswith("-of-" + world)]


def sidecar_path(path: str) -> str:
    """The sidecar of the captions file ``path`` (``captions.jsonl.meta.json``)."""
    return path + ".meta.json"


def partial_path(path: str) -> str:
    """The rows of an unfinished run into ``path``."""
    return path + ".partial"


def job_path(path: str) -> str:
    """The job description (and skipped items) of an unfinished run into ``path``."""
    return path + ".partial.json"


def writer_lock(path: str) -> FileLock:
    """The (not yet taken) lock that makes one writer at a time write ``path`` (``path.lock``)."""
    return FileLock(path + ".lock", what=path)


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


def caption_settings(decoding: str, *, beams: int, top_p: float, temperature: float, max_tokens: int, min_tokens: int):
    """The :class:`~mmcli.models.captioning.DecodeSettings` of the options, or a one-line error naming
    the option at fault. The model's own limit on ``max_tokens`` is checked once it is loaded."""
    from mmcli.models.captioning import DecodeSettings, SettingError

    try:
        return DecodeSettings(
            decoding=decoding,
            beams=beams,
            top_p=top_p,
            temperature=temperature,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
        )
    except SettingError as exc:
        raise option_error(exc) from None


def option_error(exc) -> MmcliError:
    """A :class:`~mmcli.models.captioning.SettingError` as the one-line error of its option."""
    why = exc.why.replace("max_tokens", "--max-tokens")
    return MmcliError(f"--{exc.field.replace('_', '-')} {exc.value}: {why}")


def settings_record(settings, seed: int) -> dict[str, Any]:
    """The settings that decide the captions, as recorded in the job and the sidecar: the beams of
    beam search only, and top-p's ``top_p``, ``temperature`` and ``seed`` only for top-p."""
    record: dict[str, Any] = {
        "decoding": settings.decoding,
        "max_tokens": settings.max_tokens,
        "min_tokens": settings.min_tokens,
    }
    if settings.decoding == "beam":
        record["beams"] = settings.beams
    if settings.decoding == "top-p":
        record.update(top_p=settings.top_p, temperature=settings.temperature, seed=seed)
    return record


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def caption_inputs(path: str, *, image_key: str = DEFAULT_IMAGE_KEY):
    """The images of ``path``: as ``mmcli embed`` reads them
    (:func:`~mmcli.retrieval.embedding.resolve_inputs`), or one image file, keyed by its name."""
    from mmcli.data.images import is_image_file
    from mmcli.retrieval.embedding import Inputs, Item, input_format, resolve_inputs

    p = Path(path).expanduser()
    if p.is_file() and is_image_file(p):
        folder = os.path.realpath(p.parent)
        return Inputs("image", "image", folder, items=[Item(p.name, os.path.join(folder, p.name))])
    if input_format(path) == "text":
        raise MmcliError(
            f"{path}: a text file holds texts, not images; give an image, a folder of images, "
            "a CSV/TSV/JSONL dataset file or webdataset shards"
        )
    return resolve_inputs(path, "image", image_key=image_key)


# --------------------------------------------------------------------------------------------
# the resumable output
# --------------------------------------------------------------------------------------------


@dataclass
class ResumeState:
    """What an unfinished run into a captions file had saved (see :func:`resume_state`)."""

    job: dict
    """What decides the rows: input, format, keys, image decoding, model checksum, decoding settings."""
    meta: dict
    """The sidecar fields of that run (its model ``ref`` is the default model of a resumed run)."""
    items: list[str]
    """The items of the complete rows of the partial file, in order."""
    skipped: list[dict]
    """``{"item", "reason"}`` of the items skipped so far."""
    length: int
    """Bytes of the complete rows: a torn last line (a killed run's) lies beyond and is dropped."""


def resume_state(path: str) -> ResumeState | None:
    """The progress of an unfinished run into ``path``, or ``None`` when there is none.

    The job file is written before the first row: rows without one are another program's, or
    remains of a file removed by hand, and are refused rather than guessed at."""
    partial, described = partial_path(path), job_path(path)
    if not os.path.exists(described):
        if os.path.exists(partial):
            raise MmcliError(
                f"{partial}: no job description beside it ({described}); rerun with --overwrite to discard it "
                "and start over, or choose another --out"
            )
        return None
    try:
        with open(described, encoding="utf-8") as f:
            saved = json.load(f)
        job, meta, skipped = saved["job"], saved["meta"], list(saved["skipped"])
        if not (isinstance(job, dict) and isinstance(meta, dict)):
            raise TypeError("job and meta must be objects")
    except (ValueError, KeyError, TypeError) as exc:
        raise MmcliError(
            f"{described}: not the job description of an mmcli caption run ({exc}); rerun with --overwrite to "
            "start over, or choose another --out"
        ) from None
    items, length = _complete_rows(partial) if os.path.exists(partial) else ([], 0)
    return ResumeState(job, meta, items, skipped, length)


def _complete_rows(partial: str) -> tuple[list[str], int]:
    """The items of the complete lines of ``partial`` and their length in bytes."""
    items, length = [], 0
    with open(partial, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # the last line of a run killed while writing it
            try:
                items.append(str(json.loads(line)["item"]))
            except (ValueError, KeyError, TypeError):
                raise MmcliError(
                    f"{partial}: line {number} is not a caption row; rerun with --overwrite to start over, "
                    "or choose another --out"
                ) from None
            length += len(line)
    return items, length


class CaptionWriter:
    """Stream caption rows into ``path.partial`` so that an interrupted run can resume; :meth:`finish`
    moves them to ``path`` and writes the sidecar.

    The caller holds :func:`writer_lock` of ``path``. An unfinished run's rows are continued only
    for the same ``job`` (a JSON-safe dict of whatever decides the rows); another job is refused,
    naming the first field that differs, and nothing of it is touched. ``overwrite`` discards the
    unfinished run instead; a complete ``path`` is replaced only by :meth:`finish`, so a failed
    overwrite leaves the old file (and its sidecar) as they were.
    """

    def __init__(self, path: str, *, job: dict, meta: dict, state: ResumeState | None, overwrite: bool) -> None:
        self.path, self.job, self.meta = path, _json_copy(job), _json_copy(meta)
        if overwrite:
            _unlink(partial_path(path), job_path(path))
            state = None
        if state is not None and (state.items or state.skipped):
            self._check_same_job(state)
        self.rows = len(state.items) if state else 0
        self.skipped: list[dict] = list(state.skipped) if state else []
        self._save_job()  # before the first row: rows are never without their job
        self._file = open(partial_path(path), "ab")  # noqa: SIM115 - open until finish()
        self._file.truncate(state.length if state else 0)  # drop a torn last line

    def add(self, rows: list[dict], bad: list[tuple[str, str]]) -> None:
        """Append ``rows`` (``{"item", "caption", "score"}``) and record the ``bad`` items
        (``(item, reason)``) as skipped; both are handed to the OS when this returns, so a killed
        process loses nothing added (they are not fsynced: a power cut may lose the last ones)."""
        if rows:
            self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
            self._file.flush()
            self.rows += len(rows)
        if bad:
            self.skipped += [{"item": str(item), "reason": str(reason)} for item, reason in bad]
            self._save_job()

    def finish(self) -> str:
        """Move the rows to ``path`` and write its sidecar; return ``path``."""
        self._file.close()
        # An old sidecar must never describe the new rows, even for an instant.
        _unlink(sidecar_path(self.path))
        os.replace(partial_path(self.path), self.path)
        atomic_write_json(sidecar_path(self.path), self.sidecar())
        _unlink(job_path(self.path))
        return self.path

    def close(self) -> None:
        """Stop writing without finishing: what was added stays for a resume."""
        if not self._file.closed:
            self._file.close()

    def sidecar(self) -> dict[str, Any]:
        """The sidecar of the finished file: the run's fields, counts, skipped items, when and where."""
        created = created_stamp()
        return {
            "format": FORMAT,
            "version": VERSION,
            **self.meta,
            "count": self.rows,
            "created": created,
            "skipped": self.skipped,
            "complete": True,
        }

    def _save_job(self) -> None:
        atomic_write_json(
            job_path(self.path), {"job": self.job, "meta": self.meta, "skipped": self.skipped}, indent=None
        )

    def _check_same_job(self, state: ResumeState) -> None:
        before, now = state.job, self.job
        for name in [*before, *(k for k in now if k not in before)]:
            if before.get(name) != now.get(name):
                held = len(state.items) + len(state.skipped)
                raise MmcliError(
                    f"{partial_path(self.path)} holds {held} items of another job ({name}: "
                    f"{before.get(name)} there, {now.get(name)} now); rerun with --overwrite to discard them and "
                    "start over, or choose another --out"
                )


def _json_copy(value: dict) -> dict:
    return json.loads(json.dumps(value))  # a JSON-safe copy, compared as such on resume


def _unlink(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def first_rows(path: str, n: int = FIRST_ROWS) -> list[dict]:
    """The first ``n`` rows of a captions file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) == n:
                break
            rows.append(json.loads(line))
    return rows


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


class Captioning:
    """One rank's captioning of the images of ``path`` into its captions file (see the module docstring).

    Constructing it checks everything a user can get wrong (options, input, output, model, the job
    of an unfinished run) before it captions anything, and takes the output's lock; iterating
    :meth:`batches` captions and streams the rows; :meth:`finish` moves the complete file into
    place and returns the summary. Used as a context manager it lets go of the lock at the end and,
    on an error or Ctrl-C, leaves what was written for a resume. ``settings`` come from
    :func:`caption_settings`; the other arguments are the options of ``mmcli caption``.
    """

    def __init__(
        self,
        path: str,
        out: str,
        *,
        model: str | None,
        settings,
        seed: int = 0,
        batch_size: int = 64,
        workers: int = 2,
        overwrite: bool = False,
        draft: bool = True,
        image_key: str = DEFAULT_IMAGE_KEY,
        device: str = "auto",
    ) -> None:
        from mmcli.retrieval.embedding import rank_and_world

        if batch_size < 1:
            raise MmcliError(f"--batch-size {batch_size}: must be at least 1")
        if workers < 0:
            raise MmcliError(f"--workers {workers}: must be 0 or more")
        self.settings, self.seed, self.writer = settings, seed, None
        self.rank, self.world = rank_and_world()
        self.target = output_path(out, self.rank, self.world)
        if os.path.isdir(self.target):
            raise MmcliError(f"--out {self.target}: is a folder, not a file")
        self.inputs = caption_inputs(path, image_key=image_key)
        self.source = str(Path(path).expanduser().resolve())
        if self.source == str(Path(self.target).resolve()):
            raise MmcliError(f"--out {self.target}: is the input itself; choose another --out")
        self.lock = writer_lock(self.target).acquire()  # before reading what another run may be writing
        try:
            if os.path.exists(self.target) and not overwrite:
                raise MmcliError(f"{self.target} already exists; pass --overwrite to replace it")
            self.others = other_layouts(os.fspath(out), self.target)
            if self.others and not overwrite:  # a reader must never find both layouts
                raise MmcliError(
                    f"{self.others[0]} already holds captions for --out {out} in another layout; "
                    "pass --overwrite to replace them"
                )
            state = None if overwrite else resume_state(self.target)
            ref = model or (state.meta.get("model", {}).get("ref") if state else None)
            if ref is None:
                raise MmcliError("--model: give a run folder (runs/NAME) trained with the caption objective")
            loaded = self._load(ref, device)
            job = self._describe(loaded, draft=draft, image_key=image_key)
            self.writer = CaptionWriter(self.target, job=job, meta=self.meta, state=state, overwrite=overwrite)
            done = set(state.items) | {s["item"] for s in state.skipped} if state else set()
            self._plan(loaded, done, batch_size=batch_size, workers=workers, draft=draft)
        except BaseException:
            self.close()
            raise

    def _load(self, ref: str, device: str):
        """Load the model and check that it can caption with the settings."""
        from mmcli.distributed import resolve_device
        from mmcli.models.captioning import CaptionDecoder, require_captioner
        from mmcli.models.loading import load_model

        self.device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        loaded = load_model(ref, device=self.device)
        require_captioner(loaded, f"--model {ref}")
        from mmcli.models.captioning import SettingError

        try:
            self.decoder = CaptionDecoder.of(loaded.model)
        except ValueError as exc:
            raise MmcliError(f"--model {ref}: cannot caption with it ({exc})") from None
        try:
            self.decoder.check(self.settings)
        except SettingError as exc:
            raise option_error(exc) from None
        self.tokenizer = loaded.tokenizer
        return loaded

    def _describe(self, loaded, *, draft: bool, image_key: str) -> dict:
        """Set the sidecar fields (``meta``) of this run and return its job: everything that decides
        the rows, which a resumed run must share."""
        from mmcli.retrieval.embedding import KEYED_FORMATS, decode_settings

        decode = decode_settings(loaded.preprocess, draft=draft)
        record = settings_record(self.settings, self.seed)
        keys = {"image": image_key} if self.inputs.format in KEYED_FORMATS else None
        self.meta = {
            "model": {"ref": loaded.ref, "arch": loaded.arch, "checksum": loaded.checksum},
            "decoding": record,
            "decode": decode,
            "source": {"path": self.source, "format": self.inputs.format, "root": self.inputs.root, "keys": keys},
        }
        if self.world > 1:
            self.meta["shard"] = {"rank": self.rank, "world_size": self.world}
        return {"model": loaded.checksum, "input": self.source, "format": self.inputs.format, "keys": keys} | {
            "decode": decode,
            **record,
        }

    def _plan(self, loaded, done: set[str], *, batch_size: int, workers: int, draft: bool) -> None:
        from mmcli.retrieval.embedding import image_batches

        self.loader, self.total = image_batches(
            self.inputs,
            loaded.preprocess,
            done=done,
            rank=self.rank,
            world=self.world,
            batch_size=batch_size,
            workers=workers,
            draft=draft,
        )
        self.resumed = self.writer.rows + len(self.writer.skipped)
        self.handled, self.started = 0, time.perf_counter()

    def batches(self) -> Iterator[int]:
        """Caption the images not yet done, batch by batch, writing each batch's rows (and skipped
        items) as it finishes; yield the number of items each batch handled."""
        import torch

        from mmcli.models.captioning import item_seed

        top_p = self.settings.decoding == "top-p"
        for batch in self.loader:
            rows = []
            if batch["pixels"] is not None:
                keys = batch["keys"]
                seeds = [item_seed(self.seed, key) for key in keys] if top_p else None
                with torch.inference_mode():
                    pixels = batch["pixels"].to(self.device, non_blocking=True)
                    captions = self.decoder.decode(pixels, self.settings, seeds=seeds)
                rows = [
                    {"item": key, "caption": self.tokenizer.decode(list(c.tokens)).strip(), "score": c.score}
                    for key, c in zip(keys, captions)
                ]
            self.writer.add(rows, batch["bad"])
            handled = len(rows) + len(batch["bad"])
            self.handled += handled
            yield handled

    def finish(self) -> dict[str, Any]:
        """Move the complete file into place; return the summary (``first_rows``: its first rows)."""
        seconds = time.perf_counter() - self.started
        self.writer.finish()
        if self.rank == 0:  # --overwrite: the other layout goes once this one is complete
            _unlink(*self.others, *(sidecar_path(p) for p in self.others))
        return {
            "out": self.target,
            "sidecar": sidecar_path(self.target),
            "rank": self.rank,
            "world_size": self.world,
            "model": self.meta["model"],
            "decoding": self.meta["decoding"],
            "decode": self.meta["decode"],
            "input": self.meta["source"],
            "count": self.writer.rows,
            "skipped": self.writer.skipped,
            "resumed_from": self.resumed,
            "seconds": round(seconds, 3),
            "items_per_s": round(self.handled / seconds, 1) if seconds > 0 else None,
            "device": str(self.device),
            "is_main": self.rank == 0,
            "first_rows": first_rows(self.target),
        }

    def close(self) -> None:
        """Stop (what was written stays for a resume) and let go of the lock."""
        if self.writer is not None:
            self.writer.close()
        self.lock.release()

    def __enter__(self) -> Captioning:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
