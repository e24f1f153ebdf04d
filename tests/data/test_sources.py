"""Source readers: every format, path resolution, and the error message for each mistake."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmcli.data import shapes
from mmcli.data.sources import (
    Record,
    count_shard_samples,
    read_records,
    scan_folder,
    source_format,
    webdataset_urls,
)
from mmcli.errors import MmcliError
from mmcli.spec import SourceSpec


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(out, n=20, size=32, seed=0)
    return out


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (9, 9, 9)).save(path)
    return path


def source(path: Path, **fields) -> SourceSpec:
    return SourceSpec(path=str(path), **fields)


def error(spec: SourceSpec) -> str:
    with pytest.raises(MmcliError) as info:
        read_records(spec)
    return str(info.value)


def test_shapes_tsv_resolves_paths_against_its_folder(small_shapes, monkeypatch):
    monkeypatch.chdir(small_shapes.parent)  # relative to the file, not to the working directory
    records = read_records(source(small_shapes / "val.tsv"))
    lines = (small_shapes / "val.tsv").read_text().splitlines()[1:]
    assert len(records) == 20
    first_path, first_caption = lines[0].split("\t")
    assert records[0].image == str(small_shapes / first_path)
    assert records[0].text == first_caption
    assert records[0].meta == {"filepath": first_path, "title": first_caption}
    assert all(Path(r.image).is_file() for r in records)


def test_shapes_jsonl_falls_back_to_image_and_caption_keys(small_shapes):
    records = read_records(source(small_shapes / "test.jsonl"))
    objects = [json.loads(line) for line in (small_shapes / "test.jsonl").read_text().splitlines()]
    assert [r.text for r in records] == [o["caption"] for o in objects]
    assert records[3].image == str(small_shapes / objects[3]["image"])
    assert records[3].meta == objects[3]  # the whole object, questions included


def test_jsonl_with_explicit_keys_wins_over_the_fallback(tmp_path):
    png(tmp_path / "x.png")
    line = {"path": "x.png", "text": "right", "image": "wrong.png", "caption": "wrong"}
    (tmp_path / "a.jsonl").write_text(json.dumps(line) + "\n\n")
    (record,) = read_records(source(tmp_path / "a.jsonl", image_key="path", text_key="text"))
    assert record.image == str(tmp_path / "x.png") and record.text == "right"


def test_csv_quoted_fields_and_custom_separator(tmp_path):
    png(tmp_path / "img" / "a b.png")
    (tmp_path / "pairs.csv").write_text(
        'filepath,title\n"img/a b.png","a cat, sitting ""here""\nand there"\n', encoding="utf-8"
    )
    (record,) = read_records(source(tmp_path / "pairs.csv"))
    assert record.text == 'a cat, sitting "here"\nand there'
    assert record.image == str(tmp_path / "img" / "a b.png")
    (tmp_path / "pairs.txt").write_text("file|caption\nimg/a b.png|hello\n")
    spec = source(tmp_path / "pairs.txt", format="csv", separator="|", image_key="file", text_key="caption")
    meta = {"file": "img/a b.png", "caption": "hello"}
    assert read_records(spec) == [Record(str(tmp_path / "img" / "a b.png"), "hello", meta)]


def test_absolute_paths_are_kept(tmp_path):
    image = png(tmp_path / "elsewhere" / "z.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.tsv").write_text(f"filepath\ttitle\n{image}\tzed\n")
    assert read_records(source(tmp_path / "sub" / "p.tsv"))[0].image == str(image)


def test_folder_pairs_images_with_captions_recursively(tmp_path, caplog):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first\n")
    png(tmp_path / "deep" / "b.JPG")  # PNG data behind an upper-case .JPG: only the suffix counts
    (tmp_path / "deep" / "b.txt").write_text("second")
    png(tmp_path / "deep" / "lonely.png")
    (tmp_path / "deep" / "notes.txt").write_text("not a caption of any image")
    records = read_records(source(tmp_path))
    assert [(Path(r.image).relative_to(tmp_path).as_posix(), r.text) for r in records] == [
        ("a.png", "first"),
        ("deep/b.JPG", "second"),
    ]
    assert scan_folder(tmp_path).uncaptioned == [str(tmp_path / "deep" / "lonely.png")]
    assert "skipped 1 images without a .txt caption" in caplog.text


def test_auto_format_from_suffix_and_folder_contents(tmp_path):
    cases = {"a.csv": "csv", "a.TSV": "tsv", "a.jsonl": "jsonl", "a.tar": "webdataset"}
    for name, expected in cases.items():
        (tmp_path / name).write_text("")
        assert source_format(source(tmp_path / name)) == expected
    (tmp_path / "pics").mkdir()
    assert source_format(source(tmp_path / "pics")) == "folder"
    (tmp_path / "pics" / "000.tar").write_bytes(b"")
    assert source_format(source(tmp_path / "pics")) == "webdataset"
    assert source_format(source(tmp_path / "s-{000..009}.tar")) == "webdataset"
    assert source_format(source(tmp_path / "a.csv", format="tsv")) == "tsv"


def test_webdataset_urls(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
    pattern = source(tmp_path / "s-{000..002}.tar")
    assert webdataset_urls(pattern) == [str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]
    assert webdataset_urls(source(tmp_path)) == webdataset_urls(pattern)
    assert webdataset_urls(source(tmp_path / "s-001.tar")) == [str(tmp_path / "s-001.tar")]
    with pytest.raises(MmcliError, match=r"2 of 5 shards not found, e\.g\. .*s-003\.tar"):
        webdataset_urls(source(tmp_path / "s-{000..004}.tar"))


def test_count_shard_samples_reads_member_names(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name in ("k1.jpg", "k1.txt", "k2.png", "k2.txt", "k3.txt", "dir/k.4.webp"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    assert count_shard_samples((str(tmp_path / "s.tar"),), ("jpg", "jpeg", "png", "webp")) == 3


def test_missing_file_and_unknown_suffix(tmp_path):
    assert error(source(tmp_path / "nope.csv")) == f"{tmp_path / 'nope.csv'}: no such file or folder"
    (tmp_path / "data.xlsx").write_text("")
    assert "cannot tell the format from the suffix '.xlsx'" in error(source(tmp_path / "data.xlsx"))


def test_missing_column_lists_the_columns(tmp_path):
    (tmp_path / "p.csv").write_text("image,caption\na.png,hi\n")
    message = error(source(tmp_path / "p.csv"))
    expected = "no column 'filepath' (image_key); the columns are: image, caption"
    assert message == f"{tmp_path / 'p.csv'}: {expected}"


def test_bad_json_names_the_line(tmp_path):
    png(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "caption": "x"})
    (tmp_path / "p.jsonl").write_text(f"{good}\n\n{{oops\n")
    assert error(source(tmp_path / "p.jsonl")).startswith(f"{tmp_path / 'p.jsonl'}: line 3: not valid JSON")
    (tmp_path / "q.jsonl").write_text(f'{good}\n{{"file": "a.png"}}\n')
    assert "line 2: no key 'filepath'; the keys are: file" in error(source(tmp_path / "q.jsonl"))


def test_empty_sources_and_wrong_relative_paths(tmp_path):
    (tmp_path / "p.tsv").write_text("filepath\ttitle\n")
    assert error(source(tmp_path / "p.tsv")) == f"{tmp_path / 'p.tsv'}: no image–text pairs found"
    (tmp_path / "pics").mkdir()
    png(tmp_path / "pics" / "a.png")
    assert "1 images but none has a same-name .txt caption" in error(source(tmp_path / "pics"))
    (tmp_path / "r.tsv").write_text("filepath\ttitle\nmissing.png\tx\n")
    assert "of the first record not found" in error(source(tmp_path / "r.tsv"))


def test_webdataset_is_not_a_record_list(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    assert "is streamed" in error(source(tmp_path / "a.tar"))


def test_records_are_immutable_and_hashable(tmp_path):
    record = Record(str(tmp_path / "a.png"), "t", {"k": 1})
    with pytest.raises(AttributeError):
        record.text = "u"  # type: ignore[misc]
    assert len({record, Record(record.image, "t", {"k": 1})}) == 1


def test_webdataset_urls_refuse_a_command_even_without_spec_validation(tmp_path):
    marker = tmp_path / "ran"
    fields = {**SourceSpec(path="x.tar").model_dump(), "path": f"{{a,pipe:touch {marker}}}.tar"}
    spec = SourceSpec.model_construct(**fields)  # as a caller that skipped validation would
    with pytest.raises(MmcliError, match=r"'pipe:touch .*' is opened by running a program \(scheme 'pipe'\)"):
        webdataset_urls(spec)
    assert not marker.exists()
    allowed = SourceSpec(path="pipe:cat shard.tar", allow_commands=True)
    assert webdataset_urls(allowed) == ["pipe:cat shard.tar"]  # opened only when allowed
