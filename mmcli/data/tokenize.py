"""Text → token ids for the data loaders."""

from __future__ import annotations

import torch


class Tokenize:
    """str → LongTensor[L] with open_clip's tokenizer (a class, so DataLoader workers can pickle it)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]
