"""Numbers several modules share, in one place so that no two modules import each other for them
(as open_clip's ``constants.py``)."""

from __future__ import annotations

import math

MAX_LOGIT_SCALE = math.log(100.0)
"""The learnable temperature's logit scale is clamped at 100 (CLIP, Radford et al. 2021)."""

OPEN_CLIP_VOCAB_SIZE = 49408
"""Size of open_clip's BPE vocabulary; [MASK] gets the next id."""

OPEN_CLIP_SOT_ID = 49406
"""open_clip's start-of-text id."""

OPEN_CLIP_EOT_ID = 49407
"""open_clip's end-of-text id."""

OPEN_CLIP_PAD_ID = 0
"""open_clip pads token sequences with 0."""

SPECIAL_IDS = (OPEN_CLIP_PAD_ID, OPEN_CLIP_SOT_ID, OPEN_CLIP_EOT_ID)
"""Token ids that masking never selects."""
