"""ITM's pairs gather rows several times; their gradients must not depend on thread scheduling."""

from __future__ import annotations

import hashlib

import torch

from mmcli.distributed import World


def test_itm_gradients_are_the_same_on_every_run():
    from mmcli.models.encoders import build_dual_encoder
    from mmcli.models.multimodal import build_multimodal
    from mmcli.spec import FusionSpec, ItmObjectiveSpec, ModelSpec
    from mmcli.training.objectives import itm_objective

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the nondeterminism needs more than one thread to show
    try:
        torch.manual_seed(0)
        encoder = build_dual_encoder(ModelSpec(arch="mmcli-nano"))
        model = build_multimodal(encoder.model, {"itm": ItmObjectiveSpec()}, FusionSpec(depth=1, heads=2))
        g = torch.Generator().manual_seed(5)
        images = torch.randn(32, 3, 32, 32, generator=g)
        texts = torch.randint(1, 1000, (32, 24), generator=g)
        texts[:8] = texts[8:16]  # duplicate captions, as in real batches
        digests = set()
        for _ in range(5):
            torch.manual_seed(3)
            model.zero_grad()
            outputs = model(images, texts)
            itm_objective(model, outputs, {"images": images, "texts": texts}, ItmObjectiveSpec(), World()).backward()
            h = hashlib.sha256()
            for p in model.parameters():
                if p.grad is not None:
                    h.update(p.grad.numpy().tobytes())
            digests.add(h.hexdigest())
        assert len(digests) == 1
    finally:
        torch.set_num_threads(threads)
