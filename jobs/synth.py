"""``maskray synth``: write a deterministic synthetic COCO shapes dataset (PNG + annotations.json)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix")
    parser.add_argument("--images", type=int, default=200, help="labeled images (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--categories", type=int, default=4,
                        help="number of shape categories, 1-5 (default 4: circle, square, "
                             "triangle, star; 5 adds ellipse)")
    parser.add_argument("--max-objects", type=int, default=4, help="objects per image (1..N)")
    parser.add_argument("--unlabeled", type=int, default=0,
                        help="also write this many unlabeled images to OUT/unlabeled/")
    parser.add_argument("--first-id", type=int, default=1, help="first image id (default 1)")
    parser.add_argument("--keypoints", action="store_true",
                        help="add a 'figure' category with keypoints (stick figures: head, neck, hip, "
                             "left/right hands and feet; its names and skeleton in the categories); "
                             "half of the objects are then figures")
    parser.add_argument("--mosaic", metavar="ROWSxCOLS", type=_grid, default=None,
                        help="instead: stitch ROWSxCOLS small images (--size pixels each) into one large "
                             "image whose tile seams cut objects (OUT/mosaic.png + mosaic.json COCO, "
                             "OUT/small/ the small images and their COCO json, OUT/mapping.json)")
    parser.add_argument("--tile", type=int, default=512,
                        help="with --mosaic: the tile side whose seams should cut objects (default 512)")
    parser.add_argument("--tile-overlap", type=float, default=0.2,
                        help="with --mosaic: the tiles' overlap, a fraction of --tile (default 0.2)")
    parser.add_argument("--mosaic-format", choices=("png", "tiff"), default="png",
                        help="with --mosaic: PNG (decoded whole) or tiled TIFF (read region by region)")


def _grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 8x8, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"rows and columns must be >= 1, got {text!r}")
    return rows, cols


def run(args: argparse.Namespace) -> int:
    from pipeline.data.synth import make_mosaic, synthesize

    if args.mosaic is not None:
        mosaic = make_mosaic(args.out, grid=args.mosaic, cell=args.size, seed=args.seed, tile=args.tile,
                             overlap=args.tile_overlap, image_format=args.mosaic_format,
                             num_categories=args.categories, max_objects=args.max_objects,
                             keypoints=args.keypoints)
        print(mosaic)
        print(f"annotations: {mosaic.annotations} (small images: {mosaic.small_annotations})")
        return 0

    summary = synthesize(args.out, images=args.images, seed=args.seed, size=args.size,
                         num_categories=args.categories, max_objects=args.max_objects,
                         unlabeled=args.unlabeled, first_id=args.first_id, keypoints=args.keypoints)
    print(summary)
    print(f"annotations: {summary.annotations_uri}")
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.module_main("synth"))
