"""Run specs: every shipped YAML validates; unknown keys, bad values and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

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
