"""The contrastive objective against open_clip's ClipLoss and a hand-computed 2×2 case."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from mmcli.models.constants import MAX_LOGIT_SCALE
from mmcli.training.losses import contrastive_loss


def test_equals_open_clip_clip_loss():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(16, 32, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(16, 32, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(14.3, dtype=torch.float64)
    ours = contrastive_loss(image, text, scale)
    ref = ClipLoss()(image, text, scale)
    assert abs(float(ours) - float(ref)) < 1e-6


def test_two_pairs_by_hand():
    # t1 = v1 = (1, 0), v2 = (0, 1), t2 = (0.6, 0.8): sim(t1,v1)=1, sim(t1,v2)=0, sim(t2,v1)=0.6, sim(t2,v2)=0.8
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    tau = 0.5
    e = math.exp
    # InfoNCE as CLIP writes it (text i against all images j) ...
    text_to_image = -0.5 * (
        math.log(e(1 / tau) / (e(1 / tau) + e(0 / tau))) + math.log(e(0.8 / tau) / (e(0.6 / tau) + e(0.8 / tau)))
    )
    # ... and its mirror (image i against all texts j); CLIP averages the two.
    image_to_text = -0.5 * (
        math.log(e(1 / tau) / (e(1 / tau) + e(0.6 / tau))) + math.log(e(0.8 / tau) / (e(0 / tau) + e(0.8 / tau)))
    )
    expected = (text_to_image + image_to_text) / 2
    got = contrastive_loss(v, t, torch.tensor(1 / tau, dtype=torch.float64))
    assert abs(float(got) - expected) < 1e-12
    assert abs(expected - 0.29874) < 1e-5  # the value itself, worked out on paper


def test_logit_scale_is_clamped_at_100():
    from mmcli.models.multimodal import MultimodalModel

    class Towers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(10.0))

        def encode_image(self, x):
            return x

        def encode_text(self, x):
            return x

    out = MultimodalModel(Towers())(torch.randn(2, 4), torch.randn(2, 4))
    assert math.isclose(float(out["logit_scale"].detach()), 100.0, rel_tol=1e-6)
    assert math.isclose(MAX_LOGIT_SCALE, math.log(100))
