"""COCO bbox, segm and keypoint evaluation (pycocotools ``COCOeval``) of predictions against shard ground truth.

Metrics layout, the same everywhere metrics are written::

    {"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "segm": {...same keys},
     "keypoints": {"AP", "AP50", "AP75", "APm", "APl"}}

Values are in [0, 1]. ``None`` (``null`` in JSON) stands for COCOeval's -1: no ground truth
in that size range (or no ground truth at all), so the metric is undefined. COCOeval has no
small-object keypoint AP, so ``keypoints`` has no ``APs``.

Keypoints (``iouType='keypoints'``, OKS) are evaluated on the categories whose ``keypoints``
name K points, when the ground truth has such categories and the predictions carry keypoints
(``x, y, v`` × K; OKS reads only x and y). OKS needs one sigma per keypoint: COCO person's 17
(pycocotools' default) for K = 17, and ``kpt_oks_sigmas`` (``eval.kpt_oks_sigmas``) for any
other K, checked against K: COCOeval would otherwise fail with "shapes (17,) (K,)". Ground
truth of a keypoint category without keypoints counts as ``num_keypoints = 0`` (ignored by
COCOeval, as COCO's crowd and unlabeled people are).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from model.errors import MaskrayError
from pipeline.config import require_tiling
from pipeline.instances import Instances
from pipeline.results import to_coco_results

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm", "keypoints")
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
KEYPOINT_METRIC_KEYS = ("AP", "AP50", "AP75", "APm", "APl")  # COCOeval stats[0:5] for keypoints


def default_kpt_oks_sigmas() -> np.ndarray:
    """COCO person's 17 OKS sigmas, as pycocotools sets them (``Params.setKpParams``)."""
    from pycocotools.cocoeval import Params

    return np.asarray(Params(iouType="keypoints").kpt_oks_sigmas, dtype=np.float64)


def keypoint_categories(categories: Sequence[dict]) -> dict[int, int]:
    """``{category id: K}`` of the categories that name keypoints."""
    return {int(c["id"]): len(c["keypoints"]) for c in categories if c.get("keypoints")}


def oks_sigmas(num_keypoints: int, kpt_oks_sigmas: Sequence[float] | None = None) -> np.ndarray:
    """The OKS sigmas for K = ``num_keypoints``: ``kpt_oks_sigmas`` when given (one per keypoint,
    each > 0), else COCO person's 17 when K = 17; a one-line :class:`MaskrayError` otherwise."""
    if kpt_oks_sigmas is None or len(kpt_oks_sigmas) == 0:
        default = default_kpt_oks_sigmas()
        if num_keypoints != len(default):
            raise MaskrayError(f"keypoint evaluation: K={num_keypoints} keypoints need eval.kpt_oks_sigmas "
                               f"({num_keypoints} values, one per keypoint); COCO person's 17 sigmas fit "
                               f"only K=17")
        return default
    sigmas = np.asarray([float(s) for s in kpt_oks_sigmas], dtype=np.float64)
    if len(sigmas) != num_keypoints:
        raise MaskrayError(f"keypoint evaluation: kpt_oks_sigmas has {len(sigmas)} values but the "
                           f"keypoint categories have K={num_keypoints}")
    if not np.all(np.isfinite(sigmas) & (sigmas > 0)):
        raise MaskrayError(f"keypoint evaluation: every kpt_oks_sigmas value must be > 0, got {sigmas.tolist()}")
    return sigmas


def coco_ground_truth(rows: Iterable[dict[str, Any]], categories: Sequence[dict]) -> dict[str, Any]:
    """A COCO ground-truth dataset dict from shard rows (``image_id``, ``width``, ``height``, ``annotations``).

    Annotation ids are renumbered 1..N: pycocotools treats id 0 as "unmatched". Annotations of a
    category with K keypoints carry ``keypoints`` (``x, y, v`` × K; zeros where the shard has
    none) and ``num_keypoints`` (the count of ``v > 0``); categories keep ``keypoints`` and
    ``skeleton``.
    """
    kp_cats = keypoint_categories(categories)
    images, annotations = [], []
    for row in rows:
        image_id = int(row["image_id"])
        images.append({"id": image_id, "width": int(row["width"]), "height": int(row["height"]),
                       "file_name": row.get("file_name") or str(image_id)})
        for ann in row.get("annotations") or []:
            gt = to_coco_results(image_id, [ann])[0]
            gt.pop("score")
            gt.pop("keypoints", None)
            k = kp_cats.get(int(ann["category_id"]))
            if k:
                kp = ann.get("keypoints")
                gt["keypoints"] = [float(v) for v in kp] if kp is not None and len(kp) == 3 * k else [0.0] * (3 * k)
                gt["num_keypoints"] = sum(1 for v in gt["keypoints"][2::3] if v > 0)
            gt["id"] = len(annotations) + 1
            gt["iscrowd"] = int(bool(ann.get("iscrowd")))
            gt["area"] = float(ann["area"]) if ann.get("area") is not None else float(gt["bbox"][2] * gt["bbox"][3])
            annotations.append(gt)
    cats = []
    for c in categories:
        cat = {"id": int(c["id"]), "name": str(c.get("name", c["id"])),
               "supercategory": str(c.get("supercategory", ""))}
        if c.get("keypoints"):
            cat["keypoints"] = list(c["keypoints"])
            cat["skeleton"] = [list(pair) for pair in c.get("skeleton") or []]
        cats.append(cat)
    return {"images": images, "annotations": annotations, "categories": cats}


def _quiet(fn, *args, **kwargs):
    """Call a pycocotools function with its progress prints swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _coco(dataset: dict[str, Any]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    _quiet(coco.createIndex)
    return coco


def _results_for(results: list[dict[str, Any]], iou_type: str,
                 kp_cats: dict[int, int] | None = None) -> list[dict[str, Any]]:
    """Results laid out for ``loadRes``: bbox eval uses box areas; segm eval uses mask areas and
    boxes; keypoint eval (COCO's keypoint results: no box, no mask) the keypoints of the
    keypoint categories, whose extent ``loadRes`` makes the box and area."""
    if iou_type == "bbox":
        return [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    if iou_type == "keypoints":
        out = []
        for r in results:
            k = (kp_cats or {}).get(int(r["category_id"]))
            if not k or r.get("keypoints") is None:
                continue
            if len(r["keypoints"]) != 3 * k:
                raise MaskrayError(f"image {r['image_id']}: a prediction of category {r['category_id']} has "
                                   f"{len(r['keypoints'])} keypoint values, expected 3*{k}")
            out.append({"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
                        "keypoints": [float(v) for v in r["keypoints"]]})
        return out
    return [{k: v for k, v in r.items() if k != "bbox"} for r in results if r.get("segmentation") is not None]


def default_iou_types(ground_truth: dict[str, Any], results: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """What the predictions can be scored on: ``bbox``; ``segm`` unless they carry keypoints and
    no masks (a keypoint-only model); ``keypoints`` when they carry keypoints and the ground
    truth has keypoint categories."""
    with_kp = any(r.get("keypoints") is not None for r in results)
    with_masks = any(r.get("segmentation") is not None for r in results)
    types = ["bbox"]
    if with_masks or not with_kp:
        types.append("segm")
    if with_kp and keypoint_categories(ground_truth["categories"]):
        types.append("keypoints")
    return tuple(types)


def coco_metrics(ground_truth: dict[str, Any], results: list[dict[str, Any]],
                 iou_types: Sequence[str] | None = None, *,
                 kpt_oks_sigmas: Sequence[float] | None = None) -> dict[str, dict[str, float | None]]:
    """COCOeval's metrics per IoU type, from a GT dataset dict (:func:`coco_ground_truth`) and COCO results.

    ``iou_types`` defaults to :func:`default_iou_types`. ``keypoints`` runs ``COCOeval(iouType=
    'keypoints')`` on the keypoint categories (they must share one K) with :func:`oks_sigmas`
    (``kpt_oks_sigmas``, or COCO person's 17 for K = 17) set as ``params.kpt_oks_sigmas``.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_types is None:
        iou_types = default_iou_types(ground_truth, results)
    gt = _coco(ground_truth)
    image_ids = {img["id"] for img in ground_truth["images"]}
    stray = {r["image_id"] for r in results} - image_ids
    if stray:
        raise MaskrayError(f"predictions name image ids absent from the ground truth: {sorted(stray)[:5]}")
    kp_cats = keypoint_categories(ground_truth["categories"])
    metrics: dict[str, dict[str, float | None]] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise MaskrayError(f"unknown COCO IoU type {iou_type!r}; use one of {', '.join(IOU_TYPES)}")
        keys = KEYPOINT_METRIC_KEYS if iou_type == "keypoints" else METRIC_KEYS
        sigmas = None
        if iou_type == "keypoints":
            if not kp_cats:
                raise MaskrayError("keypoint evaluation: no category of the ground truth names keypoints")
            ks = sorted(set(kp_cats.values()))
            if len(ks) > 1:
                raise MaskrayError(f"keypoint evaluation: the keypoint categories have different K {ks}; "
                                   f"OKS takes one set of sigmas")
            sigmas = oks_sigmas(ks[0], kpt_oks_sigmas)
        dets = _results_for(results, iou_type, kp_cats)
        if not ground_truth["annotations"]:
            metrics[iou_type] = dict.fromkeys(keys)
            continue
        if dets:
            dt = _quiet(gt.loadRes, dets)
        else:  # loadRes cannot take an empty list
            dt = _coco({"images": ground_truth["images"], "annotations": [],
                        "categories": ground_truth["categories"]})
        evaluator = COCOeval(gt, dt, iouType=iou_type)
        evaluator.params.imgIds = sorted(image_ids)
        if sigmas is not None:
            evaluator.params.kpt_oks_sigmas = sigmas
            evaluator.params.catIds = sorted(kp_cats)
        _quiet(evaluator.evaluate)
        _quiet(evaluator.accumulate)
        _quiet(evaluator.summarize)
        metrics[iou_type] = {key: (None if value < 0 else float(value))
                             for key, value in zip(keys, evaluator.stats[:len(keys)])}
    return metrics


def format_table(metrics: dict[str, dict[str, float | None]]) -> str:
    """A fixed-width table: one row per IoU type, AP columns in percent ("-" for undefined or absent,
    e.g. keypoints' APs)."""
    width = max([6, *(len(t) + 1 for t in metrics)])
    lines = [f"{'':{width}}" + "".join(f"{k:>8}" for k in METRIC_KEYS)]
    for iou_type, values in metrics.items():
        cells = "".join(f"{'-':>8}" if values.get(k) is None else f"{100 * values[k]:8.1f}" for k in METRIC_KEYS)
        lines.append(f"{iou_type:{width}}{cells}")
    return "\n".join(lines)


def _decode_rows(rows: Iterable[dict[str, Any]], skipped: list | None = None
                 ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """Decoded rows; with a ``skipped`` list, an undecodable row (``ImageDecodeError``: corrupt,
    unsupported, over the pixel limit) is logged, appended as ``(image_id, where, reason)`` and
    left out instead of raising."""
    from pipeline.data.decode import ImageDecodeError, decode_image

    for row in rows:
        try:
            image = decode_image(row["image"])
        except ImageDecodeError as exc:
            if skipped is None:
                raise MaskrayError(f"image {row.get('image_id')} ({row.get('file_name')}): {exc}") from exc
            where = row.get("_shard") or row.get("file_name")
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("skipped image %s in %s: %s", row.get("image_id"), where, reason)
            skipped.append((row.get("image_id"), where, reason))
            continue
        except MaskrayError:
            raise
        except Exception as exc:  # noqa: BLE001 - name the row at fault
            raise MaskrayError(f"image {row.get('image_id')} ({row.get('file_name')}): cannot decode: {exc}") from exc
        yield row, image


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_rows(model: torch.nn.Module, rows: Iterable[dict[str, Any]], *, batch_size: int = 2,
                 device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None,
                 skipped: list | None = None) -> Iterator[tuple[dict[str, Any], torch.Tensor, Instances]]:
    """Run ``model`` (eval mode) over shard rows: yields ``(row, uint8 image [3, H, W], Instances)``.

    With a ``skipped`` list undecodable rows are skipped and recorded there (see ``_decode_rows``).
    """
    device = torch.device(device)
    model.eval().to(device)
    for batch in _batches(_decode_rows(rows, skipped), max(1, batch_size)):
        images = [image.to(device, non_blocking=True).float().div_(255) for _, image in batch]
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
        for (row, image), output in zip(batch, outputs):
            output = {k: v.float() if v.is_floating_point() else v for k, v in output.items()}
            yield row, image, Instances.from_output(output, (image.shape[1], image.shape[2])).to("cpu")


def uint8_forward(model: Any, *, device: str | torch.device = "cpu",
                  amp_dtype: torch.dtype | None = None) -> Callable[[list[torch.Tensor]], list[dict[str, Any]]]:
    """What tiled evaluation runs on a batch of uint8 ``[3,h,w]`` model inputs: ``model.forward_uint8``
    when it has one (a :class:`~pipeline.infer.predictor.Predictor`, or an object answering like
    one), else that of a ``Predictor`` over the torchvision-style detector on ``device``, as the
    model actor of ``maskray infer`` runs it (boxes in the input's frame, ``[N,1,M,M]`` mask
    probabilities). The model is used as it is: no score threshold beyond its own, no
    inference rewrite (``optimize=False``). ``amp_dtype`` autocasts the call to that dtype."""
    from pipeline.infer.predictor import Predictor

    device = torch.device(device)
    run = getattr(model, "forward_uint8", None)
    if not callable(run):
        parts = ("transform", "backbone", "rpn", "roi_heads")
        if not all(hasattr(model, p) for p in parts):
            raise MaskrayError(f"tiled evaluation runs a torchvision-style detector ({', '.join(parts)}) or a model "
                               f"with forward_uint8; {type(model).__name__} has neither")
        # amp=True: the Predictor's own autocast then takes the dtype of the one around it, below
        run = Predictor(model=model, device=device, amp=amp_dtype is not None, optimize=False).forward_uint8

    def forward(images: list[torch.Tensor]) -> list[dict[str, Any]]:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return run(images)

    return forward


def segment_rows_tiled(model: Any, rows: Iterable[dict[str, Any]], *, tile: int, tile_overlap: float,
                       tile_full_pass: bool = False, category_ids: Sequence[int], batch_size: int = 2,
                       device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None,
                       skipped: list | None = None) -> Iterator[tuple[dict[str, Any], list[dict]]]:
    """Shard rows -> ``(row, its result instances)`` as ``maskray infer --tile SIZE --tile-overlap R
    [--tile-full-pass]`` makes them (:func:`pipeline.infer.tiles.segment_tiled` over
    :func:`uint8_forward`, ``batch_size`` images per call; the whole-image pass at the model's
    ``transform`` min/max size): RESULT_SCHEMA ``instances`` dicts, masks as RLE in full-image
    coordinates. ``skipped`` as in :func:`predict_rows`."""
    from pipeline.infer.predictor import model_sizes
    from pipeline.infer.tiles import segment_tiled

    forward = uint8_forward(model, device=device, amp_dtype=amp_dtype)
    model_size = model_sizes(model) if tile_full_pass else None
    for batch in _batches(_decode_rows(rows, skipped), max(1, batch_size)):
        found = segment_tiled(forward, [image for _, image in batch], tile=tile, overlap=tile_overlap,
                              full_pass=tile_full_pass, model_size=model_size, category_ids=category_ids,
                              batch_size=max(1, batch_size))
        for (row, _), instances in zip(batch, found):
            yield row, instances


def evaluate_model(model: torch.nn.Module, data: str | Iterable[dict[str, Any]],
                   categories: Sequence[dict] | None = None, *, category_ids: Sequence[int] | None = None,
                   batch_size: int = 2, device: str | torch.device = "cpu", limit: int | None = None,
                   amp_dtype: torch.dtype | None = None, skipped: list | None = None,
                   max_bad_fraction: float = 0.01,
                   kpt_oks_sigmas: Sequence[float] | None = None, tile: int = 0, tile_overlap: float = 0.2,
                   tile_full_pass: bool = False) -> dict[str, dict[str, float | None]]:
    """COCO bbox/segm (and keypoint) metrics of ``model`` on a dataset URI or on shard rows.

    What is scored follows the model's branches (torchvision's ``roi_heads.has_mask()`` /
    ``has_keypoint()``; for other models :func:`default_iou_types` of its predictions):
    ``keypoints`` when it predicts keypoints and ``categories`` name some, with
    ``kpt_oks_sigmas`` (``eval.kpt_oks_sigmas``; None: COCO person's 17, for K = 17 only).

    ``categories`` (COCO dicts) define the ground truth's categories; for a URI they default
    to the manifest's. ``category_ids`` maps model labels 1..K to category ids
    (``ModelConfig.category_ids()``); it defaults to the ids of ``categories`` in order.

    Undecodable images (corrupt, over the pixel limit) are skipped, logged with image id and
    shard, and left out of the ground truth too; ``skipped`` (a list, optional) receives
    ``(image_id, shard, reason)`` for each. More than ``max_bad_fraction`` of the evaluated
    images skipped raises :class:`MaskrayError` (metrics on what is left would mislead).

    ``tile`` > 0 scores images the way ``maskray infer --tile`` segments them: an image wider or
    taller than ``tile`` px is cut into overlapping tiles (``tile_overlap``) run at native
    resolution, with ``tile_full_pass`` once more whole at the model's size, and their instances
    merged across seams (:func:`segment_rows_tiled`); smaller images run whole. 0 (default):
    every image whole, shrunk by the model's own size rule.
    """
    require_tiling(tile, tile_overlap, tile_full_pass)
    if skipped is None:
        skipped = []
    if isinstance(data, str):
        from pipeline.data.format import read_manifest

        if categories is None:
            categories = read_manifest(data).categories
        rows: Iterable[dict[str, Any]] = _rows_with_shard(data)
    else:
        rows = data
    if categories is None:
        raise MaskrayError("evaluate_model needs the dataset's categories when given rows")
    if category_ids is None:
        category_ids = [int(c["id"]) for c in categories]
    if limit is not None:
        rows = (row for i, row in zip(range(limit), rows))

    seen: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    if tile:
        scored = ((row, to_coco_results(int(row["image_id"]), found))
                  for row, found in segment_rows_tiled(model, rows, tile=tile, tile_overlap=tile_overlap,
                                                       tile_full_pass=tile_full_pass, category_ids=category_ids,
                                                       batch_size=batch_size, device=device, amp_dtype=amp_dtype,
                                                       skipped=skipped))
    else:
        scored = ((row, instances.to_coco(int(row["image_id"]), category_ids))
                  for row, _, instances in predict_rows(model, rows, batch_size=batch_size, device=device,
                                                        amp_dtype=amp_dtype, skipped=skipped))
    for row, coco in scored:
        seen.append({k: row.get(k) for k in ("image_id", "file_name", "width", "height", "annotations")})
        results.extend(coco)
    total = len(seen) + len(skipped)
    if skipped and len(skipped) > max_bad_fraction * total:
        first = skipped[0]
        raise MaskrayError(f"evaluation: {len(skipped)} of {total} images could not be decoded (more than "
                           f"max_bad_fraction={max_bad_fraction:g}); first: image {first[0]} in {first[1]}: {first[2]}")
    if not seen:
        raise MaskrayError("evaluation got no images")
    log.info("evaluated %d images%s, %d detections%s", len(seen),
             f" (tiled: {tile} px, overlap {tile_overlap:g}{', full pass' if tile_full_pass else ''})" if tile else "",
             len(results), f"; {len(skipped)} undecodable images skipped" if skipped else "")
    ground_truth = coco_ground_truth(seen, categories)
    return coco_metrics(ground_truth, results, model_iou_types(model, categories),
                        kpt_oks_sigmas=kpt_oks_sigmas)


def model_iou_types(model: torch.nn.Module, categories: Sequence[dict]) -> tuple[str, ...] | None:
    """The IoU types a torchvision-style detector is scored on: ``bbox``, ``segm`` with a mask
    branch, ``keypoints`` with a keypoint branch and keypoint categories; None for a model
    without ``roi_heads.has_mask`` (decided from its predictions)."""
    heads = getattr(model, "roi_heads", None)
    if heads is None or not callable(getattr(heads, "has_mask", None)):
        return None
    types = ["bbox"]
    if heads.has_mask():
        types.append("segm")
    if callable(getattr(heads, "has_keypoint", None)) and heads.has_keypoint() and keypoint_categories(categories):
        types.append("keypoints")
    return tuple(types)


def _rows_with_shard(dataset_uri: str) -> Iterator[dict[str, Any]]:
    """The dataset's rows (manifest order), each tagged with its shard's file name as ``_shard``."""
    from pipeline.data.format import iter_shard_rows, shard_uris

    for uri in shard_uris(dataset_uri):
        shard = uri.rstrip("/").rsplit("/", 1)[-1]
        for row in iter_shard_rows(uri):
            row["_shard"] = shard
            yield row


def resolve_device(name: str) -> torch.device:
    """A ``--device`` value ("auto", "cpu", "cuda", "cuda:1") -> ``torch.device``; one line when CUDA is missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MaskrayError(f"--device {name}: CUDA is not available here (use --device cpu)")
    return device


def metrics_to_json(metrics: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Plain floats / None (NaN and -1 become None), ready for ``json.dumps``."""
    out = {}
    for iou_type, values in metrics.items():
        out[iou_type] = {
            k: (None if v is None or not np.isfinite(v) or v < 0 else float(v)) for k, v in values.items()
        }
    return out


def load_checkpoint_uri(uri: str, *, map_location: Any = "cpu"):
    """``(model, config, extra)`` of any model source (:func:`pipeline.weights.load_model`: a maskray
    checkpoint or a torchvision state dict at a local path or ``s3://`` URI, or a ``torchvision:`` name)."""
    from pipeline.weights import load_model

    model, config, extra, _ = load_model(uri, map_location=map_location)
    return model, config, extra
