"""Run specs: every shipped YAML validates; unknown keys, bad values and overrides."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from mmcli.errors import MmcliError
from mmcli.spec import PretrainSpec, load_spec, spec_model_for

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(path):
    spec = load_spec(path, spec_model_for(path))
    assert spec is not None


def test_examples_exist():
    assert any(p.name == "pretrain.yaml" for p in EXAMPLES)


def _write(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


BASE = "data:\n  train:\n    path: x.tsv\ntrain:\n  steps: 5\n"


def test_defaults_and_overrides(tmp_path):
    spec = load_spec(_write(tmp_path, BASE), PretrainSpec, ["train.lr=3e-4", "data.batch_size=8", "output.name=abc"])
    assert spec.train.lr == 3e-4 and spec.data.batch_size == 8 and spec.output.name == "abc"
    assert spec.model.arch == "mmcli-tiny"
    assert set(spec.objectives.enabled()) == {"clip"}
    assert spec.run_dir() == Path("runs/abc")


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(MmcliError, match=r"s.yaml: train.lrr: unknown key"):
        load_spec(_write(tmp_path, BASE + "  lrr: 1\n"), PretrainSpec)


def test_bad_value_is_named(tmp_path):
    with pytest.raises(MmcliError, match=r"train.lr: Input should be greater than 0"):
        load_spec(_write(tmp_path, BASE), PretrainSpec, ["train.lr=-1"])


def test_steps_xor_epochs(tmp_path):
    with pytest.raises(MmcliError, match="exactly one of train.steps and train.epochs"):
        load_spec(_write(tmp_path, BASE), PretrainSpec, ["train.epochs=2"])


def test_zero_weight_objectives_rejected(tmp_path):
    with pytest.raises(MmcliError, match="at least one objective"):
        load_spec(_write(tmp_path, BASE + "objectives:\n  clip:\n    weight: 0\n"), PretrainSpec)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(MmcliError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml", PretrainSpec)
    with pytest.raises(MmcliError, match=r"not valid YAML \(line 2\)"):
        load_spec(_write(tmp_path, "a: 1\n b: [\n"), PretrainSpec)


def test_override_needs_key_value(tmp_path):
    with pytest.raises(MmcliError, match="expected KEY=VALUE"):
        load_spec(_write(tmp_path, BASE), PretrainSpec, ["train.lr"])


def test_every_field_is_documented():
    from pydantic import BaseModel

    from mmcli import spec as spec_module

    missing, checked = [], 0
    for obj in vars(spec_module).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__.startswith(spec_module.__name__):
            checked += 1
            missing += [f"{obj.__name__}.{n}" for n, f in obj.model_fields.items() if not f.description]
    assert missing == []
    assert checked >= 25  # every section model of the package was looked at


# --------------------------------------------------------------------------------------------
# integrity: finite numbers, every mistake named, plain model names, no commands, bounded YAML
# --------------------------------------------------------------------------------------------


def _sections():
    from mmcli.spec import Section

    found, todo = [], [Section]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("mmcli.spec") and sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def _float_fields():
    import typing

    def has_float(annotation) -> bool:
        return annotation is float or any(has_float(a) for a in typing.get_args(annotation))

    return [(cls, name) for cls in _sections() for name, f in cls.model_fields.items() if has_float(f.annotation)]


def test_every_float_field_of_every_section_refuses_infinity_and_nan():
    fields = _float_fields()
    assert len(fields) >= 20  # lr, eps, weight_decay, betas, the objectives' weights, fusion, graph, ...
    accepted = []
    for cls, name in fields:
        annotation = cls.model_fields[name].annotation
        for bad in (float("inf"), float("-inf"), float("nan")):
            value = (0.9, bad) if "tuple" in str(annotation) else bad
            try:
                cls.model_validate({name: value})
            except ValidationError as exc:
                if any(e["loc"][:1] == (name,) and e["type"] == "finite_number" for e in exc.errors()):
                    continue
            accepted.append(f"{cls.__name__}.{name}={bad}")
    assert accepted == []


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=.nan", "train.betas=[0.9, .inf]"])
def test_non_finite_override_is_named(tmp_path, override):
    field = override.split("=")[0]
    with pytest.raises(MmcliError, match=rf"s.yaml: {re.escape(field)}(\.1)?: Input should be a finite number"):
        load_spec(_write(tmp_path, BASE), PretrainSpec, [override])


def test_non_finite_number_inside_model_config_is_named(tmp_path):
    text = BASE + "model:\n  arch: mine\n  config: {embed_dim: 8, vision_cfg: {x: [1, .nan]}, text_cfg: {}}\n"
    with pytest.raises(MmcliError, match=r"s.yaml: model\.config\.vision_cfg\.x\[1\]: must be a finite number"):
        load_spec(_write(tmp_path, text), PretrainSpec)


def test_every_mistake_is_named_on_one_line(tmp_path):
    text = "data:\n  train:\n    path: x.tsv\n  batch_size: 0\ntrain:\n  steps: 1\n  lr: -1\n  colour: red\n"
    with pytest.raises(MmcliError) as info:
        load_spec(_write(tmp_path, text), PretrainSpec)
    message = str(info.value)
    assert "\n" not in message and "more)" not in message
    for part in ("data.batch_size: Input should be greater than 0", "train.lr: Input should be greater than 0"):
        assert part in message
    assert "train.colour: unknown key" in message


def test_a_validator_sentence_is_shown_without_pydantic_prefix(tmp_path):
    with pytest.raises(MmcliError) as info:
        load_spec(_write(tmp_path, BASE + "  epochs: 2\n"), PretrainSpec)
    assert "Value error" not in str(info.value) and "give exactly one of train.steps" in str(info.value)


@pytest.mark.parametrize("arch", ["../../evil", "a/b", "..", "x/../y", "/abs", "evil\\x", "with space", ""])
def test_model_arch_must_be_a_plain_name(tmp_path, arch):
    text = BASE + f"model:\n  arch: {json.dumps(arch)}\n  config: {{embed_dim: 8, vision_cfg: {{}}, text_cfg: {{}}}}\n"
    with pytest.raises(MmcliError, match=r"s.yaml: model\.arch: .* is not a model name"):
        load_spec(_write(tmp_path, text), PretrainSpec)


@pytest.mark.parametrize("arch", ["ViT-B-32", "mmcli-tiny", "convnext_base_w_320", "EVA02-B-16", "hf-hub:org/model"])
def test_open_clip_names_and_hub_ids_stay_valid(tmp_path, arch):
    spec = load_spec(_write(tmp_path, BASE + f"model:\n  arch: {arch}\n"), PretrainSpec)
    assert spec.model.arch == arch


def test_hub_ids_cannot_name_an_inline_config(tmp_path):
    text = BASE + "model:\n  arch: hf-hub:a/b\n  config: {embed_dim: 8, vision_cfg: {}, text_cfg: {}}\n"
    with pytest.raises(MmcliError, match="is not a model name"):
        load_spec(_write(tmp_path, text), PretrainSpec)


COMMAND_PATHS = [
    "pipe:touch /tmp/owned",
    "PIPE:cat x.tar",
    "https://example.com/shard-{000..009}.tar",
    "http://example.com/a.tar",
    "sftp://host/a.tar",
    "ftps://host/a.tar",
    "scp://host/a.tar",
    "gs://bucket/a.tar",
    "s3://bucket/a.tar",
    "ais://bucket/a.tar",
    "hf://datasets/x/a.tar",
    "htgs://x/a.tar",
    "{a,pipe:touch /tmp/owned}.tar",
]


@pytest.mark.parametrize("path", COMMAND_PATHS)
def test_urls_that_run_a_program_need_allow_commands(tmp_path, path):
    text = f"data:\n  train:\n    path: {json.dumps(path)}\ntrain:\n  steps: 5\n"
    with pytest.raises(
        MmcliError, match=r"s.yaml: data\.train\.path: .* opens by running a program.* allow_commands: true"
    ):
        load_spec(_write(tmp_path, text), PretrainSpec)
    allowed = text.replace("\ntrain:\n  steps", "\n    allow_commands: true\ntrain:\n  steps")
    assert load_spec(_write(tmp_path, allowed), PretrainSpec).data.train.allow_commands is True


def test_every_command_scheme_of_webdataset_is_refused():
    from webdataset.gopen import gopen_schemes

    from mmcli.spec import command_url

    schemes = [s for s in gopen_schemes if s != "__default__"]
    assert {"pipe", "http", "https", "gs"} <= set(schemes)
    assert all(command_url(f"{s}:x.tar") == f"{s}:x.tar" for s in schemes)
    assert all(command_url(p) is None for p in ["a.tar", "shards/{000..009}.tar", "file:///data/a.tar", "./x:y"])


def test_local_paths_with_a_colon_in_map_style_formats_are_files(tmp_path):
    text = "data:\n  train:\n    path: 'x:y.tsv'\n    format: tsv\ntrain:\n  steps: 5\n"
    assert load_spec(_write(tmp_path, text), PretrainSpec).data.train.path == "x:y.tsv"


def _bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines)


def test_a_yaml_alias_bomb_in_a_spec_is_refused_at_once(tmp_path):
    text = BASE + "model:\n  arch: mine\n  config:\n" + "\n".join("    " + line for line in _bomb(10).splitlines())
    start = time.perf_counter()
    with pytest.raises(MmcliError, match=r"s.yaml: not accepted as a spec: its aliases expand to more than 100,000"):
        load_spec(_write(tmp_path, text), PretrainSpec)
    assert time.perf_counter() - start < 5  # 9**10 values would take minutes and gigabytes


def test_a_yaml_alias_bomb_in_an_override_is_refused(tmp_path):
    flow = "{" + ", ".join(line.replace(": ", ": ", 1) for line in _bomb(10).splitlines()) + "}"
    with pytest.raises(MmcliError, match=r"--set model.config: its aliases expand"):
        load_spec(_write(tmp_path, BASE), PretrainSpec, [f"model.config={flow}"])


def test_modest_anchors_and_merge_keys_still_work(tmp_path):
    text = "data:\n  train: &src\n    path: x.tsv\n  val:\n    <<: *src\n    text_key: caption\ntrain:\n  steps: 5\n"
    spec = load_spec(_write(tmp_path, text), PretrainSpec)
    assert spec.data.val.path == "x.tsv" and spec.data.val.text_key == "caption"


def test_recursive_alias_is_refused(tmp_path):
    with pytest.raises(MmcliError, match="recursive alias"):
        load_spec(_write(tmp_path, BASE + "model:\n  config: &c {a: *c}\n"), PretrainSpec)


# --------------------------------------------------------------------------------------------
# a spec given to the wrong command is named by its kind
# --------------------------------------------------------------------------------------------

KIND_OF_EXAMPLE = {"pretrain": "pretrain", "fuse": "fuse", "eval": "eval"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
@pytest.mark.parametrize("command", ["pretrain", "fuse", "eval"])
def test_every_example_given_to_another_command_is_named_by_its_kind(path, command):
    from mmcli.spec import kind_of, load_spec_of_kind, read_yaml

    kind = KIND_OF_EXAMPLE[path.name.split("-")[0].split(".")[0]]
    if command == kind:
        assert kind_of(read_yaml(path), command) is None
        assert load_spec_of_kind(path, command) is not None
    else:
        with pytest.raises(MmcliError) as err:
            load_spec_of_kind(path, command)
        article = "an" if kind == "eval" else "a"
        assert str(err.value) == f"{path} is {article} {kind} spec: run it with mmcli {kind}"


def test_a_misspelt_top_level_key_is_not_taken_for_another_kind(tmp_path):
    from mmcli.spec import load_spec_of_kind

    with pytest.raises(MmcliError, match=r"s.yaml: objectivs: unknown key$"):
        load_spec_of_kind(_write(tmp_path, BASE + "objectivs:\n  clip: {}\n"), "pretrain")
    # keys of two kinds at once (base is fuse's, objectives pretrain's only): no kind is guessed
    with pytest.raises(MmcliError, match=r"s.yaml: base: unknown key$"):
        load_spec_of_kind(_write(tmp_path, BASE + "base: runs/x\nobjectives:\n  clip: {}\n"), "pretrain")
