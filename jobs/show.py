"""``maskray show``: overlays (masks, boxes, class names, scores) of predictions (``python -m jobs.show``).

Three ways:

- ``--results PREFIX`` alone: a static gallery of a ``maskray infer`` output, no model and no
  ``--data`` (:func:`pipeline.show.gallery.build_gallery`): ``--out``/index.html with per-category
  counts and a score histogram over every row, overlays and thumbnails of the first ``--limit``
  images (read from the input its provenance.json records), and the error rows. A huge image
  (over 50 MP) gets a downsampled overview read region by region and full-resolution crops around
  its ``--crops`` best detections.
- ``--results PREFIX --data URI``: ``<image_id>.png`` overlays of the stored predictions on the
  first ``--limit`` images of the dataset ``--data``.
- ``--checkpoint URI --data URI``: runs the checkpoint on the first ``--limit`` images of ``--data``
  and writes ``<image_id>.png`` overlays.

Overlays are drawn at a readable size (``--long-side``, default 1280 px: small images upscaled,
photos shrunk) with captions in a font scaled to it; ``--out`` is a local folder or ``s3://`` prefix.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs import cli

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="URI", help="run this maskray checkpoint on the images")
    source.add_argument("--results", metavar="URI",
                        help="a maskray infer output prefix: a browsable gallery (OUT/index.html) of it, "
                             "or with --data PNG overlays of its stored predictions")
    parser.add_argument("--data", metavar="URI",
                        help="dataset (maskray shards) holding the images; needed with --checkpoint. "
                             "Without it, --results writes a gallery of the images its run read")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder or s3:// prefix for the overlays")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="first N images (default 16; 64 in a --results gallery)")
    parser.add_argument("--score-thresh", type=float, default=0.5, metavar="S",
                        help="draw instances scoring at least S (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=2, metavar="N", help="images per forward pass (default 2)")
    parser.add_argument("--long-side", type=int, default=1280, metavar="PX",
                        help="draw overlays with this longer side (small images upscaled, photos shrunk; default 1280)")
    parser.add_argument("--crops", type=int, default=16, metavar="N",
                        help="--results gallery of huge images (over 50 MP): a downsampled overview read region by "
                             "region, and full-resolution crops around the N best detections (default 16)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    if args.results and not args.data:  # a gallery of a results prefix: no model, no --data
        from pipeline.show.gallery import DEFAULT_LIMIT, build_gallery

        summary = build_gallery(args.results, args.out, limit=DEFAULT_LIMIT if args.limit is None else args.limit,
                                long_side=args.long_side, score_thresh=args.score_thresh, crops=args.crops)
        print(summary.line())
        return 0

    from itertools import islice

    from pipeline.evaluate import resolve_device
    from model.errors import MaskrayError
    from pipeline import storage
    from pipeline.data.decode import decode_image
    from pipeline.evaluate import load_checkpoint_uri, predict_rows
    from pipeline.data.format import read_manifest, read_rows
    from pipeline.instances import Instances
    from pipeline.results import iter_rows, to_coco_results
    from pipeline.show.draw import render_overlay, to_png

    if not args.data:
        raise MaskrayError("--checkpoint needs --data (the dataset to run it on)")
    args.limit = 16 if args.limit is None else args.limit
    if args.limit < 1:
        raise MaskrayError(f"--limit must be >= 1, got {args.limit}")
    if args.long_side < 16:
        raise MaskrayError(f"--long-side must be >= 16, got {args.long_side}")
    manifest = read_manifest(args.data)
    names = {int(c["id"]): str(c["name"]) for c in manifest.categories}
    skeletons = {int(c["id"]): c.get("skeleton") for c in manifest.categories}  # drawn with keypoints
    rows = list(islice(read_rows(args.data, columns=["image_id", "file_name", "width", "height", "image"]),
                       args.limit))

    drawn: list[tuple[dict, object, list[dict]]] = []  # (row, uint8 image, COCO results)
    if args.checkpoint:
        model, config, _ = load_checkpoint_uri(args.checkpoint)
        for c in config.categories:
            names.setdefault(int(c["id"]), str(c["name"]))
        category_ids = config.category_ids()
        unused = {category_ids[label - 1] for label in config.unused_labels()}  # torchvision's "N/A"
        device = resolve_device(args.device)
        for row, image, instances in predict_rows(model, rows, batch_size=args.batch_size, device=device):
            results = instances.to_coco(int(row["image_id"]), category_ids)
            drawn.append((row, image, [r for r in results if r["category_id"] not in unused]))
    else:
        stored = {int(r["image_id"]): r for r in iter_rows(args.results, ["image_id", "instances", "error"],
                                                           image_ids={int(r["image_id"]) for r in rows})}
        for row in rows:
            result = stored.get(int(row["image_id"]))
            if result is None:
                logger.warning("image %s: no stored result, skipped", row["image_id"])
                continue
            if result.get("error"):
                logger.warning("image %s: stored result has an error (%s), skipped", row["image_id"], result["error"])
                continue
            drawn.append((row, decode_image(row["image"]), to_coco_results(row["image_id"], result["instances"])))

    ids = sorted(names.keys() | {r["category_id"] for _, _, results in drawn for r in results})
    label_names = [names.get(i, str(i)) for i in ids]
    for row, image, results in drawn:
        size = (int(image.shape[1]), int(image.shape[2]))
        overlay = render_overlay(image, Instances.from_coco(results, size, ids), label_names,
                                 score_thresh=args.score_thresh, long_side=args.long_side,
                                 skeletons=[skeletons.get(i) for i in ids])
        storage.write_bytes(storage.join(args.out, f"{int(row['image_id'])}.png"), to_png(overlay), fsync=False)
    logger.info("wrote %d overlays to %s", len(drawn), args.out)
    print(f"{len(drawn)} overlays in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.module_main("show"))
