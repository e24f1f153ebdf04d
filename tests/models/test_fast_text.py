"""The start-up-light text encoder equals open_clip's text tower, and avoids importing open_clip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from mmcli.models import weights as ckpt
    from mmcli.models.encoders import build_dual_encoder
    from mmcli.models.multimodal import MultimodalModel
    from mmcli.spec import ModelSpec

    torch.manual_seed(0)
    encoder = build_dual_encoder(ModelSpec(arch="mmcli-nano"))
    out = tmp_path_factory.mktemp("run")
    ckpt.save_open_clip_config(out, encoder.model_config, encoder.preprocess_config)
    ckpt.save_weights(out, MultimodalModel(encoder.model), {"arch": "mmcli-nano", "modules": {}})
    return out


TEXTS = ["a red circle", "a blue square above a green triangle and a purple diamond", "", "x " * 40]


def test_same_embeddings_as_open_clip(run_dir):
    from mmcli.models.fast_text import text_encoder_for
    from mmcli.models.loading import load_model

    fast = text_encoder_for(run_dir)
    loaded = load_model(str(run_dir))
    tokens = loaded.tokenizer(TEXTS)
    assert torch.equal(fast.tokenize(TEXTS), tokens)
    with torch.no_grad():
        ref = loaded.model.encode_text(tokens)
    assert torch.allclose(fast(TEXTS), ref, atol=1e-5)


def test_no_open_clip_import(run_dir):
    code = (
        "import sys, json\n"
        "from mmcli.models.fast_text import text_encoder_for\n"
        f"e = text_encoder_for({str(run_dir)!r})(['a red circle'])\n"
        "heavy = [m for m in ('open_clip', 'torchvision', 'timm') if m in sys.modules]\n"
        "print(json.dumps({'shape': list(e.shape), 'heavy': heavy}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out == {"shape": [1, 32], "heavy": []}


def test_non_standard_config_falls_back(tmp_path):
    from mmcli.models.fast_text import is_standard_text_tower

    assert is_standard_text_tower({"text_cfg": {"width": 64, "heads": 2, "layers": 2}})
    assert not is_standard_text_tower({"text_cfg": {"hf_model_name": "bert-base-uncased"}})
    assert not is_standard_text_tower({"text_cfg": {"width": 64, "no_causal_mask": True}})
    assert not is_standard_text_tower({"text_cfg": {"width": 64, "ls_init_value": 1e-4}})
