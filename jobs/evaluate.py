"""``maskray eval``: COCO bbox/segm (and keypoint) AP of a checkpoint on labeled shards (``python -m jobs.evaluate`` is the same).

Loads the checkpoint (our format: model state + config with categories), runs the model over
every image of the dataset (or the first ``--limit``), evaluates with pycocotools ``COCOeval``
against the shards' ground truth, prints the AP table and optionally writes ``metrics.json``
(``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "segm": {...}}``, values in [0, 1],
``null`` where COCOeval has no ground truth of that size). A keypoint model on a dataset whose
categories name keypoints also gets ``"keypoints": {"AP", "AP50", "AP75", "APm", "APl"}`` (OKS;
``--kpt-oks-sigmas`` for a skeleton other than COCO person's 17 keypoints). ``--tile SIZE
--tile-overlap R [--tile-full-pass]`` scores large images the way ``maskray infer`` with the same
flags segments them (:func:`pipeline.infer.tiles.segment_tiled`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs import cli

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="URI",
                        help="maskray checkpoint or torchvision state dict (local path or s3://), or a torchvision "
                             "name: torchvision:maskrcnn_resnet50_fpn_v2, torchvision:maskrcnn_resnet50_fpn")
    parser.add_argument("--data", required=True, metavar="URI", help="labeled dataset (maskray shards prefix)")
    parser.add_argument("--out", metavar="URI", help="write metrics JSON here")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images")
    parser.add_argument("--batch-size", type=int, default=2, metavar="N", help="images per forward pass (default 2)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="autocast dtype for inference (CUDA; default none)")
    parser.add_argument("--kpt-oks-sigmas", type=sigma_list, metavar="S1,S2,...",
                        help="OKS sigmas, one per keypoint, for keypoint AP (default: COCO person's 17, "
                             "which fit only K=17)")
    parser.add_argument("--tile", type=int, default=0, metavar="SIZE",
                        help="score images wider or taller than SIZE px as `maskray infer --tile SIZE` segments them: "
                             "SIZE x SIZE tiles at native resolution, instances merged across seams "
                             "(default 0 = off: every image shrunk to the model's size)")
    parser.add_argument("--tile-overlap", type=float, default=0.2, metavar="R",
                        help="with --tile: the fraction of a tile its neighbour overlaps (default 0.2), as infer's")
    parser.add_argument("--tile-full-pass", action="store_true",
                        help="with --tile: also run each tiled image whole at the model's size, as infer's")


def sigma_list(text: str) -> list[float]:
    """``--kpt-oks-sigmas`` "0.05,0.1,..." -> floats."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def resolve_device(name: str):
    """``--device`` -> torch.device (kept here for jobs.show until it imports pipeline.evaluate's)."""
    from pipeline.evaluate import resolve_device as resolve

    return resolve(name)


def amp_dtype(name: str):
    import torch

    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def check_categories(checkpoint: str, model_categories: list[dict], data: str, data_categories: list[dict]) -> None:
    """Fail when the model's category ids share nothing with the dataset's; warn when they differ."""
    from model.errors import MaskrayError

    if not model_categories:
        return  # unnamed labels: label i is category id i
    ours = {int(c["id"]) for c in model_categories}
    theirs = {int(c["id"]) for c in data_categories}
    if not ours & theirs:
        raise MaskrayError(f"checkpoint {checkpoint} predicts category ids {sorted(ours)[:10]} but dataset {data} "
                           f"has ids {sorted(theirs)[:10]}: they share none")
    if ours != theirs:
        logger.warning("checkpoint and dataset categories differ: only %d shared ids are evaluated", len(ours & theirs))


def run(args: argparse.Namespace) -> int:
    import json

    from model.errors import MaskrayError
    from pipeline import storage
    from pipeline.config import require_tiling
    from pipeline.evaluate import evaluate_model, format_table, load_checkpoint_uri, metrics_to_json
    from pipeline.data.format import read_manifest

    if args.limit is not None and args.limit < 1:
        raise MaskrayError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise MaskrayError(f"--batch-size must be >= 1, got {args.batch_size}")
    require_tiling(args.tile, args.tile_overlap, args.tile_full_pass)
    device = resolve_device(args.device)
    model, config, _ = load_checkpoint_uri(args.checkpoint)
    manifest = read_manifest(args.data)
    check_categories(args.checkpoint, config.categories, args.data, manifest.categories)
    logger.info("evaluating %s (%s %s, %d classes) on %s, device %s", args.checkpoint, config.backbone,
                config.variant, config.num_classes - 1, args.data, device)
    metrics = evaluate_model(model, args.data, manifest.categories, category_ids=config.category_ids(),
                             batch_size=args.batch_size, device=device, limit=args.limit,
                             amp_dtype=amp_dtype(args.amp), kpt_oks_sigmas=args.kpt_oks_sigmas,
                             tile=args.tile, tile_overlap=args.tile_overlap, tile_full_pass=args.tile_full_pass)
    print(format_table(metrics))
    if args.out:
        storage.write_bytes(args.out, (json.dumps(metrics_to_json(metrics), indent=2) + "\n").encode())
        logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("eval"))
