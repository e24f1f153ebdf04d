"""Region–concept alignment accuracy of a graph fusion on the shapes dataset (``mmcli eval``).

Each image is reasoned over with its own caption's concepts. For every object of the image, the
region that overlaps its box most stands for it (with the given boxes, its own box), and the
object counts as aligned when that region's best-aligned concept names the object's own colour
and/or shape and nothing else of the kind ("red circle", "red" or "circle" for a red circle; not
"blue circle"). Relation concepts ("left of") pass messages in the graph but are no region's
alignment, so the pick is among the object and attribute concepts, and ``chance`` is a random
pick among those. The box labels serve only this scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_iou

from mmcli.data.shapes import COLORS, SHAPES

MIN_IOU = 0.3
"""An automatic region stands for an object only when it overlaps the object's box this much."""


def names_object(concept: str, color: str, shape: str) -> bool:
    """Whether ``concept`` names the object: it has a colour or shape word, and each such word is
    the object's own."""
    named = [w for w in concept.split() if w in COLORS or w in SHAPES]
    return bool(named) and all(w in (color, shape) for w in named)


def match_regions(object_boxes: torch.Tensor, region_boxes: torch.Tensor, min_iou: float = MIN_IOU) -> list[int | None]:
    """For each object box [O, 4], the index of the region box [R, 4] overlapping it most, or
    ``None`` when no region reaches ``min_iou``."""
    if len(object_boxes) == 0 or len(region_boxes) == 0:
        return [None] * len(object_boxes)
    best, index = box_iou(object_boxes.float(), region_boxes.float()).max(dim=1)
    return [int(i) if float(b) >= min_iou else None for b, i in zip(best, index)]


def alignment_hits(
    alignment: torch.Tensor, concepts: list[str], objects: list[tuple[str, str]], regions: list[int | None]
) -> list[bool]:
    """One hit or miss per object: ``objects[o]`` is ``(color, shape)`` and ``regions[o]`` its
    region (a row of ``alignment`` [R, C]; ``None``: no region, a miss)."""
    hits = []
    for (color, shape), region in zip(objects, regions):
        if region is None or not concepts:
            hits.append(False)
            continue
        best = int(alignment[region, : len(concepts)].argmax())
        hits.append(names_object(concepts[best], color, shape))
    return hits


def chance_rate(concepts: list[str], color: str, shape: str) -> float:
    """The hit rate of picking one of ``concepts`` at random for the object."""
    return sum(names_object(c, color, shape) for c in concepts) / len(concepts) if concepts else 0.0


@torch.no_grad()
def evaluate_alignment(
    run_dir: str | Path, jsonl_path: str | Path, *, regions: str | None = None, device="cpu", batch_size: int = 64
) -> dict[str, Any]:
    """Alignment accuracy of a graph-fusion run on a shapes JSONL file (see the module docstring),
    with ``chance`` (the accuracy of picking a caption concept at random for each region), the
    share of objects that got a region, and the graph iterations run (the most of any batch)."""
    from mmcli.data.batches import to_device
    from mmcli.data.concepts import extract_concepts
    from mmcli.data.examples import Example, ExampleDataset, example_loader, input_boxes, read_shapes_jsonl
    from mmcli.data.tokenize import Tokenize
    from mmcli.errors import MmcliError
    from mmcli.models.downstream import pair_inputs, uses_graph
    from mmcli.models.loading import load_model

    loaded = load_model(str(run_dir), device=device)
    model = loaded.model
    if not uses_graph(model):
        raise MmcliError(f"alignment: {run_dir} has no region–concept graph (train it with fusion.strategy: graph)")
    records = read_shapes_jsonl(jsonl_path)
    examples = [
        Example(
            r["id"],
            r["image"],
            r["caption"],
            "",
            "caption",
            tuple(tuple(o["box"]) for o in r.get("objects", [])),
            r["caption"],
        )
        for r in records
    ]
    dataset = ExampleDataset(examples, [], loaded.preprocess, Tokenize(loaded.tokenizer), concepts=True)
    model.eval()
    hits, chance, matched, iterations, converged = [], [], 0, 0, True
    for batch in example_loader(dataset, batch_size=batch_size, train=False, seed=0):
        batch = to_device(batch, device)
        inputs = pair_inputs(model, batch)
        out = model.fusion.reason(inputs, regions)
        boxes, box_mask = model.fusion.region_boxes(inputs, regions)
        iterations, converged = max(iterations, out.iterations), converged and out.converged
        for row, index in enumerate(batch["index"].tolist()):
            record = records[index]
            objects = [(o["color"], o["shape"]) for o in record["objects"]]
            size = (record.get("width", 0), record.get("height", 0))
            object_boxes = torch.tensor(input_boxes(examples[index].boxes, size, tuple(batch["images"].shape[-2:])))
            found = match_regions(object_boxes.reshape(-1, 4), boxes[row][box_mask[row]].cpu())
            found_concepts = extract_concepts(record["caption"])
            concepts = [c.text for c in found_concepts]
            hits += alignment_hits(out.alignment[row].cpu(), concepts, objects, found)
            grounded = [c.text for c in found_concepts if c.grounded]  # what the alignment picks from
            chance += [chance_rate(grounded, c, s) if f is not None else 0.0 for (c, s), f in zip(objects, found)]
            matched += sum(f is not None for f in found)
    n = len(hits)  # no object scored: no figure (None), not 0

    def share(total: float) -> float | None:
        return round(total / n, 4) if n else None

    return {
        "accuracy": share(sum(hits)),
        "n_objects": n,
        "chance": share(sum(chance)),
        "objects_with_region": share(matched),
        "regions": regions or model.fusion.settings.get("regions", "given"),
        "iterations": iterations,
        "max_iters": model.fusion.settings.get("max_iters"),
        "converged": converged,
    }
