"""mmcli caption: rows equal to the CoCa decoder's own captions for every input kind, broken images
listed, resuming to the same file, refusing another job, top-p seeds, shards, errors and --json."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.commands.caption import run as caption
from mmcli.errors import MmcliError
from mmcli.inference.captions import CaptionWriter
from mmcli.models.captioning import CaptionDecoder, DecodeSettings

NAMES = ["a.png", "b.png", "c.png", "d.png", "sub/e.png"]
BROKEN = "z/broken.png"  # sorted last: the batches of the valid images are those of a folder without it
FAST = {"max_tokens": 6, "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def photos(shapes_dir, tmp_path_factory):
    """Five shapes images (one in a subfolder) and a file of garbage bytes named like a PNG."""
    root = tmp_path_factory.mktemp("photos")
    sources = sorted((shapes_dir / "images" / "test").glob("*.png"))
    for name, source in zip(NAMES, sources):
        (root / name).parent.mkdir(exist_ok=True)
        shutil.copy(source, root / name)
    (root / "z").mkdir()
    (root / BROKEN).write_bytes(b"\x89PNG garbage, not an image" * 4)
    return root


@pytest.fixture(scope="module")
def peaked_run(coca_run, tmp_path_factory):
    """``coca_run`` with its vocabulary projection scaled up, so that next-token distributions are
    peaked as a trained model's are. A random model's are nearly uniform over 49,408 tokens: there
    the last bits of a batched matrix product (which depend on the batch size) can change the token
    a top-p draw lands on."""
    from mmcli.models import weights
    from mmcli.models.loading import load_model

    out = tmp_path_factory.mktemp("peaked-run")
    loaded = load_model(str(coca_run))
    with torch.no_grad():
        loaded.model.clip.text_decoder.text_projection.mul_(8)
    shutil.copy(coca_run / "open_clip_config.json", out / "open_clip_config.json")
    weights.save_weights(out, loaded.model, {"arch": loaded.arch, "modules": loaded.model.modules_config})
    return out


def reference_rows(run_dir, paths: dict[str, str], batch_size: int, **settings) -> list[dict]:
    """The rows of ``paths`` ({key: image file}) from CaptionDecoder.decode on open_clip's transform
    of each image, in batches of ``batch_size`` as the command forms them."""
    from mmcli.models.loading import load_model

    loaded = load_model(str(run_dir))
    decoder = CaptionDecoder.of(loaded.model)
    keys, rows = list(paths), []
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        images = torch.stack([loaded.preprocess(Image.open(paths[k]).convert("RGB")) for k in chunk])
        for key, found in zip(chunk, decoder.decode(images, DecodeSettings(**settings))):
            text = loaded.tokenizer.decode(list(found.tokens)).strip()
            rows.append({"item": key, "caption": text, "score": found.score})
    return rows


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def assert_rows_equal(rows: list[dict], expected: list[dict]) -> None:
    assert [(r["item"], r["caption"]) for r in rows] == [(r["item"], r["caption"]) for r in expected]
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_folder_rows_are_the_decoders_captions_and_a_broken_image_is_listed(photos, coca_run, tmp_path):
    out = tmp_path / "captions.jsonl"
    result = caption(str(photos), str(out), model=str(coca_run), batch_size=2, **FAST)
    expected = reference_rows(coca_run, {n: photos / n for n in NAMES}, 2, max_tokens=6)
    rows = read_rows(out)
    assert_rows_equal(rows, expected)
    assert all(r["caption"] and r["score"] < 0 for r in rows)  # mean log-probabilities
    assert result["skipped"] == [{"item": BROKEN, "reason": "not an image"}]
    assert (result["count"], result["resumed_from"], result["first_rows"]) == (5, 0, rows)
    meta = json.loads((tmp_path / "captions.jsonl.meta.json").read_text(encoding="utf-8"))
    assert meta["model"]["checksum"] == json.loads((coca_run / "mmcli.json").read_text())["checksum"]
    assert meta["decoding"] == {"decoding": "greedy", "max_tokens": 6, "min_tokens": 0}
    assert (meta["count"], meta["skipped"], meta["complete"]) == (5, result["skipped"], True)
    assert meta["source"] == {
        "path": str(photos.resolve()),
        "format": "folder",
        "root": str(photos.resolve()),
        "keys": None,
    }
    assert sorted(os.listdir(tmp_path)) == ["captions.jsonl", "captions.jsonl.meta.json"]  # no partial, job or lock


def test_dataset_file_single_image_and_webdataset_shards(photos, coca_run, tmp_path):
    # A TSV listing an image twice: captioned once, keyed by its path relative to the file's folder.
    (tmp_path / "pairs.tsv").write_text(
        "filepath\ttitle\n" + "".join(f"{photos / n}\tcap\n" for n in [NAMES[0], NAMES[4], NAMES[0]])
    )
    caption(str(tmp_path / "pairs.tsv"), str(tmp_path / "d.jsonl"), model=str(coca_run), batch_size=1, **FAST)
    keys = [os.path.relpath(photos / n, os.path.commonpath([tmp_path, photos])) for n in [NAMES[0], NAMES[4]]]
    expected = reference_rows(coca_run, dict(zip(keys, [photos / NAMES[0], photos / NAMES[4]])), 1, max_tokens=6)
    assert_rows_equal(read_rows(tmp_path / "d.jsonl"), expected)

    caption(str(photos / "sub" / "e.png"), str(tmp_path / "one.jsonl"), model=str(coca_run), **FAST)
    assert_rows_equal(read_rows(tmp_path / "one.jsonl"), [{**expected[1], "item": "e.png"}])

    shards = tmp_path / "shards"
    shards.mkdir()
    for n, members in enumerate(
        [{"k0.png": photos / NAMES[0], "k1.png": photos / NAMES[4]}, {"k2.png": photos / BROKEN}]
    ):
        with tarfile.open(shards / f"{n:05d}.tar", "w") as tar:
            for name, source in members.items():
                data = source.read_bytes()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    result = caption(str(shards), str(tmp_path / "w.jsonl"), model=str(coca_run), batch_size=1, **FAST)
    renamed = [{**row, "item": key} for row, key in zip(expected, ["00000.tar/k0", "00000.tar/k1"])]
    assert_rows_equal(read_rows(tmp_path / "w.jsonl"), renamed)
    assert result["skipped"] == [{"item": "00001.tar/k2", "reason": "not an image"}]


def _caption_interrupted_at_the_second_batch(photos, out, coca_run, monkeypatch, **options) -> None:
    """A caption run of ``photos`` (batches of 2) stopped by Ctrl-C as its second batch is written."""
    original, calls = CaptionWriter.add, {"n": 0}

    def add_then_stop(self, rows, bad):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        original(self, rows, bad)

    monkeypatch.setattr(CaptionWriter, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        caption(str(photos), str(out), model=str(coca_run), batch_size=2, **FAST, **options)
    monkeypatch.setattr(CaptionWriter, "add", original)


def test_an_interrupted_run_resumes_to_the_file_of_an_uninterrupted_one(photos, coca_run, tmp_path, monkeypatch):
    whole = tmp_path / "whole.jsonl"
    caption(str(photos), str(whole), model=str(coca_run), batch_size=2, **FAST)
    out = tmp_path / "captions.jsonl"
    _caption_interrupted_at_the_second_batch(photos, out, coca_run, monkeypatch)
    assert not out.exists()  # the rows so far are only in the partial file
    assert [r["item"] for r in read_rows(f"{out}.partial")] == NAMES[:2]
    with open(f"{out}.partial", "a", encoding="utf-8") as f:
        f.write('{"item": "c.png", "capt')  # a row torn by a kill
    result = caption(str(photos), str(out), batch_size=2, **FAST)  # the model comes from the partial run
    assert result["resumed_from"] == 2
    assert out.read_bytes() == whole.read_bytes()
    assert result["skipped"] == [{"item": BROKEN, "reason": "not an image"}]
    assert not os.path.exists(f"{out}.partial") and not os.path.exists(f"{out}.partial.json")


def test_another_job_is_refused_and_overwrite_replaces_only_when_complete(photos, coca_run, tmp_path, monkeypatch):
    out = tmp_path / "captions.jsonl"
    _caption_interrupted_at_the_second_batch(photos, out, coca_run, monkeypatch)
    partial = open(f"{out}.partial", "rb").read()
    for options, field in [
        ({"decoding": "beam"}, "decoding: greedy there, beam now"),
        ({"max_tokens": 5}, "max_tokens: 6 there, 5 now"),
        ({"draft": False}, "decode: {'draft': [32, 32]} there, {'draft': None} now"),
    ]:
        with pytest.raises(MmcliError) as refused:
            caption(str(photos), str(out), model=str(coca_run), batch_size=2, **{**FAST, **options})
        assert str(refused.value) == (
            f"{out}.partial holds 2 items of another job ({field}); "
            "rerun with --overwrite to discard them and start over, or choose another --out"
        )
    with pytest.raises(MmcliError, match=r"holds 2 items of another job \(input: "):
        caption(str(photos / "sub"), str(out), model=str(coca_run), batch_size=2, **FAST)
    assert open(f"{out}.partial", "rb").read() == partial  # nothing of the interrupted run is lost

    caption(str(photos), str(out), model=str(coca_run), decoding="beam", beams=2, overwrite=True, **FAST)
    complete, sidecar = out.read_bytes(), open(f"{out}.meta.json", "rb").read()
    assert json.loads(sidecar)["decoding"] == {"decoding": "beam", "max_tokens": 6, "min_tokens": 0, "beams": 2}
    with pytest.raises(MmcliError, match="captions.jsonl already exists; pass --overwrite to replace it"):
        caption(str(photos), str(out), model=str(coca_run), **FAST)
    _caption_interrupted_at_the_second_batch(photos, out, coca_run, monkeypatch, overwrite=True)
    assert out.read_bytes() == complete and open(f"{out}.meta.json", "rb").read() == sidecar  # the old file survives


def test_a_second_writer_of_the_same_out_is_refused_before_loading_anything(photos, coca_run, tmp_path):
    from mmcli.inference.captions import writer_lock

    out = tmp_path / "captions.jsonl"
    with writer_lock(str(out)):  # what a running caption holds: an exclusive flock, its pid inside
        with pytest.raises(MmcliError) as refused:
            caption(str(photos), str(out), model=str(coca_run), **FAST)
    assert str(refused.value) == (
        f"{out} is being written by another process (pid {os.getpid()}, lock {out}.lock); "
        "wait for it to finish, or stop it"
    )
    assert os.listdir(tmp_path) == []


def test_top_p_captions_depend_on_the_seed_not_on_the_batch_size(photos, peaked_run, tmp_path):
    options = {**FAST, "decoding": "top-p", "max_tokens": 12}
    runs = {}
    for name, batch_size, seed in [("one", 1, 0), ("three", 3, 0), ("other", 3, 1)]:
        caption(
            str(photos),
            str(tmp_path / f"{name}.jsonl"),
            model=str(peaked_run),
            batch_size=batch_size,
            seed=seed,
            **options,
        )
        runs[name] = read_rows(tmp_path / f"{name}.jsonl")
    assert_rows_equal(runs["three"], runs["one"])
    greedy = reference_rows(peaked_run, {n: photos / n for n in NAMES}, 3, max_tokens=12)
    assert any(a["caption"] != b["caption"] for a, b in zip(runs["one"], runs["other"]))  # another seed
    assert any(a["caption"] != b["caption"] for a, b in zip(runs["one"], greedy))  # sampled, not the argmax


def test_ranks_write_shards_that_concatenate_to_the_single_process_file(photos, coca_run, tmp_path, monkeypatch):
    single = tmp_path / "single.jsonl"
    caption(str(photos), str(single), model=str(coca_run), batch_size=1, **FAST)
    out = tmp_path / "captions.jsonl"
    monkeypatch.setenv("WORLD_SIZE", "2")
    results = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        results.append(caption(str(photos), str(out), model=str(coca_run), batch_size=1, **FAST))
    shards = [tmp_path / "captions.rank00000-of-00002.jsonl", tmp_path / "captions.rank00001-of-00002.jsonl"]
    assert [r["out"] for r in results] == [str(s) for s in shards] and not out.exists()
    assert [r["is_main"] for r in results] == [True, False]
    items = [row["item"] for shard in shards for row in read_rows(shard)]
    assert sorted(items) == sorted(NAMES) and len(items) == len(set(items))  # every item exactly once
    assert b"".join(s.read_bytes() for s in shards) == single.read_bytes()
    skipped = [json.loads(open(f"{s}.meta.json").read())["skipped"] for s in shards]
    assert skipped == [[], [{"item": BROKEN, "reason": "not an image"}]]
    assert json.loads(open(f"{shards[1]}.meta.json").read())["shard"] == {"rank": 1, "world_size": 2}

    # a single-process run into the same --out would sit beside the shards: refused, then replaces them
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(MmcliError, match="captions.rank00000-of-00002.jsonl already holds captions for --out"):
        caption(str(photos), str(out), model=str(coca_run), batch_size=1, **FAST)
    caption(str(photos), str(out), model=str(coca_run), batch_size=1, overwrite=True, **FAST)
    assert out.read_bytes() == single.read_bytes()
    assert not any(p.exists() or Path(f"{p}.meta.json").exists() for p in shards)


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(app, ["--device", "cpu", "caption", *map(str, args)])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmcli: error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def test_user_mistakes_are_one_line_errors(photos, coca_run, nano_run, tmp_path):
    out = tmp_path / "c.jsonl"
    line = _one_line_error(_invoke(photos, "--out", out, "--model", coca_run, "--max-tokens", 24))
    assert line == "mmcli: error: --max-tokens 24: more than the model's text context allows; use at most 23"
    line = _one_line_error(_invoke(photos, "--out", out, "--model", nano_run, "--max-tokens", 6))
    assert line.startswith(f"mmcli: error: --model {nano_run} has no caption decoder") and "caption objective" in line
    from tests.conftest import save_random_run

    untrained = save_random_run(tmp_path / "clip-only-coca", "mmcli-nano-coca")  # no caption module
    line = _one_line_error(_invoke(photos, "--out", out, "--model", untrained, "--max-tokens", 6))
    assert line.endswith("is a CoCa run trained without the caption objective: its decoder never learned to caption")
    line = _one_line_error(_invoke(photos, "--out", out, "--model", coca_run, "--decoding", "nucleus"))
    assert line == "mmcli: error: --decoding nucleus: choose one of greedy, beam, top-p"
    line = _one_line_error(_invoke(photos, "--out", tmp_path / "c.txt", "--model", coca_run))
    assert line.endswith("the captions file name must end with .jsonl")
    (tmp_path / "q.txt").write_text("a red circle\n")
    assert "a text file holds texts, not images" in _one_line_error(_invoke(tmp_path / "q.txt", "--out", out))
    assert not out.exists() and not os.path.exists(f"{out}.partial")


def test_json_prints_only_the_summary_on_stdout(photos, coca_run, tmp_path):
    out = tmp_path / "c.jsonl"
    result = _invoke(photos / "a.png", "--out", out, "--model", coca_run, "--max-tokens", 6, "--workers", 0, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["first_rows"] == read_rows(out) and summary["count"] == 1 and summary["out"] == str(out)
    human = _invoke(photos / "a.png", "--out", out, "--model", coca_run, "--max-tokens", 6, "--overwrite")
    assert human.exit_code == 0 and "a.png" in human.stdout and summary["first_rows"][0]["caption"][:10] in human.stdout


def test_help_names_every_decoding_and_the_options_default_to_the_decoders_defaults():
    import inspect

    from mmcli.cli import caption as command
    from mmcli.spec.choices import DECODINGS

    text = CliRunner().invoke(app, ["caption", "--help"], terminal_width=200).stdout
    assert all(name in text for name in DECODINGS)
    params = inspect.signature(command).parameters
    for field in ("decoding", "beams", "top_p", "temperature", "max_tokens", "min_tokens"):
        assert params[field].default == getattr(DecodeSettings(), field), field


def test_caption_help_imports_neither_torch_nor_open_clip():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mmcli.cli import app\n"
        "assert CliRunner().invoke(app, ['caption', '--help']).exit_code == 0\n"
        "print([m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
