"""mmcli embed: every valid image embedded exactly as open_clip would, every invalid one reported,
resuming, shards, texts and dataset files."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mmcli.commands.embed import run as embed
from mmcli.errors import MmcliError
from mmcli.retrieval import index as ix
from tests.conftest import stopped_at_add

VALID = [
    "a.png",
    "sub/a.png",
    "ünï cödé 画像.png",
    "UPPER.JPG",
    "sixteen.png",
    "cmyk.jpg",
    "palette.gif",
    "rotated.jpg",
]
INVALID = {"bad/truncated.jpg": "truncated", "bad/zero.png": "zero bytes", "bad/notes.jpg": "not an image"}


def noise(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Eight valid images of every awkward kind, three broken files and a non-image file.

    Images are at most 48 px: below twice the model's 32 px a JPEG draft cannot reduce the
    scale, so open_clip's own pipeline on the full image is an exact reference."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    (root / "bad").mkdir()
    noise(40, 30, 0).save(root / "a.png")
    noise(40, 30, 1).save(root / "sub" / "a.png")  # same name, another folder
    noise(36, 36, 2).save(root / "ünï cödé 画像.png")
    (root / "UPPER.JPG").write_bytes(jpeg(noise(48, 40, 3)))
    grey16 = (np.random.default_rng(4).integers(0, 65536, (30, 40))).astype(np.uint16)
    Image.fromarray(grey16).save(root / "sixteen.png")
    (root / "cmyk.jpg").write_bytes(jpeg(noise(40, 30, 5).convert("CMYK")))
    noise(40, 30, 6).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90° clockwise
    (root / "rotated.jpg").write_bytes(jpeg(noise(48, 32, 7), exif=exif.tobytes()))
    truncated = jpeg(noise(48, 40, 8))
    (root / "bad" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (root / "bad" / "zero.png").write_bytes(b"")
    (root / "bad" / "notes.jpg").write_text("not a picture\n")
    (root / "readme.txt").write_text("not an image suffix: never listed\n")
    return root


def reference_embedding(run_dir, image: Image.Image) -> np.ndarray:
    """open_clip's own pipeline: create_model_and_transforms, preprocess, encode_image."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir}")
    model.eval()
    with torch.no_grad():
        return model.encode_image(preprocess(image)[None], normalize=True)[0].numpy()


def rows_by_item(path) -> dict[str, np.ndarray]:
    index = ix.open_index(path)
    return {item: np.asarray(index.embeddings[i], np.float32) for i, item in enumerate(index.items)}


def test_corrupt_corpus_embeds_every_valid_image_and_reports_every_invalid_one(corpus, nano_run, tmp_path):
    out = str(tmp_path / "emb.npy")
    result = embed(str(corpus), out, model=str(nano_run), batch_size=4, workers=1, progress=False)
    index = ix.open_index(out)
    assert sorted(index.items) == sorted(VALID) and len(set(index.items)) == len(VALID)
    assert {s["item"]: s["reason"] for s in index.meta["skipped"]} == INVALID
    assert result["count"] == 8 and len(result["skipped"]) == 3
    norms = np.linalg.norm(np.asarray(index.embeddings), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    meta = json.loads((tmp_path / "emb.npy.json").read_text(encoding="utf-8"))
    assert meta["model"]["checksum"] == json.loads((nano_run / "mmcli.json").read_text())["checksum"]
    assert (meta["modality"], meta["dim"], meta["dtype"], meta["count"]) == ("image", 32, "float32", 8)
    assert meta["root"] == str(corpus.resolve()) and meta["created"]["time"]


def test_rows_equal_open_clip_on_the_upright_rgb_image(corpus, nano_run, tmp_path):
    out = str(tmp_path / "emb.npy")
    embed(str(corpus), out, model=str(nano_run), batch_size=3, workers=0, progress=False)
    rows = rows_by_item(out)
    for name in ("a.png", "sub/a.png", "ünï cödé 画像.png", "UPPER.JPG", "palette.gif"):
        expected = reference_embedding(nano_run, Image.open(corpus / name).convert("RGB"))
        np.testing.assert_allclose(rows[name], expected, atol=1e-5)
    upright = ImageOps.exif_transpose(Image.open(corpus / "rotated.jpg")).convert("RGB")
    assert upright.size == (32, 48)
    np.testing.assert_allclose(rows["rotated.jpg"], reference_embedding(nano_run, upright), atol=1e-5)
    assert not np.allclose(rows["a.png"], rows["sub/a.png"], atol=1e-3)  # two files, two rows


def test_interrupted_run_leaves_nothing_complete_and_resumes_to_the_same_index(corpus, nano_run, tmp_path, monkeypatch):
    whole = str(tmp_path / "whole.npy")
    embed(str(corpus), whole, model=str(nano_run), batch_size=3, workers=0, progress=False)
    out = str(tmp_path / "emb.npy")
    _embed_interrupted_at_the_second_batch(corpus, out, nano_run, monkeypatch)
    assert not ix.index_exists(out)
    with pytest.raises(MmcliError, match="incomplete"):
        ix.open_index(out)
    result = embed(str(corpus), out, progress=False, batch_size=3, workers=0)  # the model comes from the partial run
    assert result["resumed_from"] == 3  # the first batch of three sorted files
    before, after = rows_by_item(whole), rows_by_item(out)
    assert sorted(before) == sorted(after)
    for item in before:
        np.testing.assert_allclose(after[item], before[item], atol=1e-6)


def _embed_interrupted_at_the_second_batch(corpus, out: str, nano_run, monkeypatch) -> None:
    """An embed of ``corpus`` (batches of 3) stopped by Ctrl-C as its second batch is written."""
    stopped_at_add(
        monkeypatch, 2, lambda: embed(str(corpus), out, model=str(nano_run), batch_size=3, workers=0, progress=False)
    )


def test_complete_index_needs_overwrite(corpus, nano_run, tmp_path):
    out = str(tmp_path / "emb.npy")
    embed(str(corpus / "sub"), out, model=str(nano_run), workers=0, progress=False)
    with pytest.raises(MmcliError, match="already exists; pass --update .* or --overwrite"):
        embed(str(corpus / "sub"), out, model=str(nano_run), workers=0, progress=False)
    result = embed(str(corpus), out, model=str(nano_run), workers=0, overwrite=True, progress=False)
    assert result["count"] == 8 and len(ix.open_index(out)) == 8


def test_a_rerun_of_another_job_is_refused_and_the_same_job_still_resumes(corpus, nano_run, tmp_path, monkeypatch):
    out = str(tmp_path / "emb.npy")
    _embed_interrupted_at_the_second_batch(corpus, out, nano_run, monkeypatch)
    partial = open(out + ".partial", "rb").read()
    for path, options, field in [
        (corpus / "sub", {}, f"input: {corpus.resolve()} there, {(corpus / 'sub').resolve()} now"),
        (corpus, {"draft": False}, "decode: {'draft': [32, 32]} there, {'draft': None} now"),
        (corpus, {"dtype": "float16"}, "dtype: float32 there, float16 now"),
    ]:
        with pytest.raises(MmcliError) as refused:
            embed(str(path), out, model=str(nano_run), batch_size=3, workers=0, progress=False, **options)
        assert str(refused.value) == (
            f"{out}.partial holds 2 rows of another job ({field}); "
            "rerun with --overwrite to discard them and start over, or choose another --out"
        )
    assert open(out + ".partial", "rb").read() == partial  # nothing of the interrupted run is lost
    assert embed(str(corpus), out, batch_size=3, workers=0, progress=False)["resumed_from"] == 3
    assert sorted(ix.open_index(out).items) == sorted(VALID)
    embed(str(corpus / "sub"), out, model=str(nano_run), workers=0, overwrite=True, progress=False)
    assert ix.open_index(out).items == ["a.png"]


def test_a_second_embed_into_the_same_out_is_a_one_line_error(corpus, nano_run, tmp_path):
    import fcntl
    import subprocess
    import sys

    out = tmp_path / "emb.npy"
    with open(f"{out}.lock", "w") as held:  # what a running embed holds: an exclusive flock, its pid inside
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        second = subprocess.run(
            [sys.executable, "-m", "mmcli", "embed", str(corpus), "--out", str(out), "--model", str(nano_run)],
            capture_output=True,
            text=True,
        )
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"mmcli: error: {out} is being written by another process (pid {os.getpid()}, lock {out}.lock); "
        "wait for it to finish, or stop it"
    ]
    assert not os.path.exists(f"{out}.partial") and not os.path.exists(out)


def test_ranks_write_shards_that_read_as_the_single_process_index(corpus, nano_run, tmp_path, monkeypatch):
    single = str(tmp_path / "single.npy")
    embed(str(corpus), single, model=str(nano_run), workers=0, progress=False)
    out = str(tmp_path / "emb.npy")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        embed(str(corpus), out, model=str(nano_run), workers=0, progress=False)
    assert [p.split("/")[-1] for p in ix.open_index(out).files] == [
        "emb.rank00000-of-00002.npy",
        "emb.rank00001-of-00002.npy",
    ]
    one, sharded = ix.open_index(single), ix.open_index(out)
    assert sharded.items == one.items
    assert sorted(s["item"] for s in sharded.meta["skipped"]) == sorted(INVALID)
    np.testing.assert_allclose(np.asarray(sharded.embeddings), np.asarray(one.embeddings), atol=1e-6)


def test_text_file_rows_are_the_text_towers_embeddings(nano_run, tmp_path):
    from mmcli.models.loading import load_model

    texts = ["a red circle", "a blue square above a green triangle", "ünïcödé"]
    (tmp_path / "q.txt").write_text("\n".join([texts[0], "  ", texts[1], texts[2]]) + "\n", encoding="utf-8")
    out = str(tmp_path / "t.npy")
    result = embed(str(tmp_path / "q.txt"), out, model=str(nano_run), dtype="float16", progress=False)
    index = ix.open_index(out)
    assert result["modality"] == "text" and index.items == texts and index.embeddings.dtype == np.float16
    loaded = load_model(str(nano_run))
    with torch.no_grad():
        expected = loaded.model.encode_text(loaded.tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(np.asarray(index.embeddings, np.float32), expected, atol=2e-3)


def test_dataset_file_embeds_each_image_once_with_paths_relative_to_the_file(shapes_dir, nano_run, tmp_path):
    tsv = tmp_path / "pairs.tsv"
    lines = (shapes_dir / "test.tsv").read_text().splitlines()
    rows = [line.split("\t") for line in lines[1:4]]
    body = [f"{shapes_dir / r[0]}\t{r[1]}" for r in rows] + [f"{shapes_dir / rows[0][0]}\tanother caption"]
    tsv.write_text("filepath\ttitle\n" + "\n".join(body) + "\n")
    out = str(tmp_path / "d.npy")
    embed(str(tsv), out, model=str(nano_run), workers=0, progress=False)
    index = ix.open_index(out)
    # The images lie outside the file's folder: the root is the folder that holds them all, so no
    # item climbs out of it with "..".
    root = os.path.commonpath([os.path.realpath(tmp_path), os.path.realpath(shapes_dir / "images" / "test")])
    assert index.meta["root"] == root
    assert index.items == [os.path.relpath(os.path.realpath(shapes_dir / r[0]), root) for r in rows]  # listed twice
    assert [index.item_path(item) for item in index.items] == [os.path.join(root, item) for item in index.items]
    assert not any(".." in item.split("/") for item in index.items)
    in_place = tmp_path / "local"
    in_place.mkdir()
    (in_place / "a.png").write_bytes((shapes_dir / rows[0][0]).read_bytes())
    (in_place / "pairs.tsv").write_text("filepath\ttitle\na.png\ta caption\n")
    embed(str(in_place / "pairs.tsv"), str(tmp_path / "l.npy"), model=str(nano_run), workers=0, progress=False)
    local = ix.open_index(str(tmp_path / "l.npy"))
    assert (local.meta["root"], local.items) == (os.path.realpath(in_place), ["a.png"])  # beside the file: its folder
    texts = embed(str(tsv), str(tmp_path / "c.npy"), model=str(nano_run), modality="text", progress=False)
    assert texts["count"] == 4


def test_bad_arguments_are_one_line_errors(corpus, nano_run, tmp_path):
    with pytest.raises(MmcliError, match="must end with .npy"):
        embed(str(corpus), str(tmp_path / "emb.bin"), model=str(nano_run), progress=False)
    with pytest.raises(MmcliError, match="--model"):
        embed(str(corpus), str(tmp_path / "emb.npy"), progress=False)
    with pytest.raises(MmcliError, match="no image files"):
        embed(str(tmp_path), str(tmp_path / "emb.npy"), model=str(nano_run), progress=False)


def test_webdataset_shards_are_keyed_by_shard_and_sample(corpus, nano_run, tmp_path):
    import tarfile

    members = {
        "s0/a.png": (corpus / "a.png").read_bytes(),
        "s0/a.txt": b"caption",
        "s0/b.jpg": (corpus / "bad" / "truncated.jpg").read_bytes(),
    }
    shards = tmp_path / "shards"
    shards.mkdir()
    for n, names in enumerate([["s0/a.png", "s0/a.txt"], ["s0/b.jpg"]]):
        with tarfile.open(shards / f"{n:05d}.tar", "w") as tar:
            for name in names:
                info = tarfile.TarInfo(name.replace("s0/", f"k{n}/"))
                info.size = len(members[name])
                tar.addfile(info, io.BytesIO(members[name]))
    out = str(tmp_path / "w.npy")
    embed(str(shards), out, model=str(nano_run), workers=2, progress=False)
    index = ix.open_index(out)
    assert index.items == ["00000.tar/k0/a"]
    assert index.meta["skipped"] == [{"item": "00001.tar/k1/b", "reason": "truncated"}]
    expected = reference_embedding(nano_run, Image.open(corpus / "a.png").convert("RGB"))
    np.testing.assert_allclose(index.embeddings[0], expected, atol=1e-5)
