"""Batch segmentation of maskray shards: a plain-loop predictor and a streaming Ray Data pipeline.

Public API
----------
``Predictor(checkpoint_uri=None, *, model=None, config=None, device=None, amp=None, score_threshold=0.0)``
    A callable model wrapper. The checkpoint is read from storage once per instance (once per
    Ray Data actor). ``predictor.predict(images)`` is the plain loop: a list of ``[3,H,W]``
    images (uint8, or float in [0,1]) -> torchvision-style output dicts in each input's frame
    (``boxes`` xyxy, ``labels``, ``scores``, ``masks`` float ``[N,1,H,W]`` probabilities).
    ``predictor(images)`` (a list of tensors) does the same, so a Predictor can stand in for the
    model anywhere a torchvision detector is called. ``predictor(batch)`` with a ``pyarrow.Table``
    is the Ray Data actor stage (see "Stages").
``predict_images(model, images, *, transforms=None, score_threshold=0.0, device=None, amp=None)``
    One call of the above for an ``nn.Module`` (a torchvision / ``model.build_maskrcnn`` Mask R-CNN)
    or a ``Predictor``. ``transforms`` is the test-time-augmentation hook: a callable
    ``transforms(predict_fn, images) -> outputs`` that receives the plain ``predict_fn`` (list of
    images -> output dicts in each input's frame) and returns what it likes (e.g.
    ``lambda fn, ims: pipeline.pseudo.predict_tta(fn, ims, tta_config)``).
``run_inference(dataset_uri, output_uri, checkpoint_uri, *, batch_size=4, actors=1, gpus_per_actor=None,
    cpus_per_actor=None, score_threshold=0.05, coco_json=None, predictor_factory=None, max_pixels=50_000_000, on_shard_committed=None)``
    The Ray Data job behind ``maskray infer``; returns an :class:`InferenceSummary`.
    ``predictor_factory`` replaces :class:`Predictor` in the actor pool: a subclass, constructed
    with the same keyword arguments, that may override ``forward_resized`` (same contract) or
    ``process_batch`` (e.g. to run TTA in the actors).
``result_uri(output_uri, shard_path)``: where the results of one input shard go.

Stages (``run_inference``)
--------------------------
1. shard list from the manifest; shards whose result file exists with the manifest's row count
   are skipped (resume).
2. read: short Ray tasks, each reading a bounded row range of one pending shard (the shard's
   row count comes from the manifest; only overlapping row groups are fetched; columns
   ``image_id``, ``file_name``, ``image``), tag every row with its key ``(shard, row)``.
3. decode + resize on CPU tasks (``pipeline.dataset.decode_image``, with a max-pixels guard;
   the resize is the model's own ``min_size``/``max_size`` rule, done here so the actor does not
   repeat it). A row that cannot be decoded carries ``error`` from here on.
4. model on an actor pool (``map_batches`` with a callable class, ``ActorPoolStrategy``; one GPU
   per actor with AMP when the cluster has GPUs, CPU actors otherwise, each running torch on its
   share of the cluster's cores, :func:`cpu_actor_threads`). Ray Data's actor pool
   restarts a dead actor (``max_restarts=-1``) and retries its batch (``max_task_retries=-1``).
   The actor returns boxes in original coordinates and the low-resolution mask probabilities.
5. post-process on CPU tasks: masks pasted at the original size, binarized at 0.5, COCO RLE.
6. commit, on the driver: rows stream back and are grouped by shard; a shard's results file is
   written in ONE atomic ``storage.write_bytes`` (tmp+rename locally, a single PUT on S3) as
   soon as all its rows are there.

Exactly-once invariant: a results file ``<output>/<shard name>`` exists  <=>  it holds exactly
one row per row of that input shard (keys ``(shard, row)`` are de-duplicated on the driver, so a
batch retried after an actor death can never add a row twice, and nothing is written for a
shard until every one of its rows has arrived). Every input row yields one result row: images
that fail to decode or to run get ``error`` set and no instances.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from model.errors import MaskrayError

logger = logging.getLogger(__name__)

READ_COLUMNS = ["image_id", "file_name", "image"]
DEFAULT_MAX_PIXELS = 50_000_000  # as pipeline.dataset; larger images become error rows
# Error messages are stored per row; keep them bounded.
_MAX_ERROR_CHARS = 500


# --------------------------------------------------------------------------- helpers


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:_MAX_ERROR_CHARS]


def _to_float(image: torch.Tensor) -> torch.Tensor:
    """A ``[3,H,W]`` image as float32 in [0,1] (uint8 is divided by 255)."""
    if image.dtype == torch.uint8:
        return image.to(torch.float32).div_(255.0)
    if not image.is_floating_point():
        raise MaskrayError(f"image of dtype {image.dtype} is neither uint8 nor float")
    return image.to(torch.float32)


def model_sizes(model: torch.nn.Module) -> tuple[int, int]:
    """``(min_size, max_size)`` of a torchvision detector's internal resize (eval: last min_size)."""
    transform = model.transform
    return int(transform.min_size[-1]), int(transform.max_size)


def resize_for_model(image: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """Resize a float ``[3,H,W]`` image exactly as torchvision's GeneralizedRCNNTransform does
    in eval mode (shorter side to ``min_size``, longer side at most ``max_size``, bilinear)."""
    from torchvision.models.detection.transform import _resize_image_and_masks

    resized, _ = _resize_image_and_masks(image, float(min_size), float(max_size))
    return resized


def _unwrap(model: Any) -> torch.nn.Module:
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def load_model(checkpoint_uri: str) -> tuple[torch.nn.Module, Any, str]:
    """``(model, config, model_id)`` from a checkpoint at any storage URI; ``model_id`` names the
    checkpoint and a digest of its bytes (the ``model`` column of results)."""
    from model.checkpoint import load_checkpoint
    from pipeline import storage

    data = storage.read_bytes(checkpoint_uri)
    model, config, _ = load_checkpoint(data, map_location="cpu")
    return model, config, f"{checkpoint_uri}#sha256:{hashlib.sha256(data).hexdigest()[:16]}"


# --------------------------------------------------------------------------- predictor


class Predictor:
    """A Mask R-CNN ready for inference on one device; the same object serves a plain loop
    (:meth:`predict`) and a Ray Data actor (``__call__`` with a ``pyarrow.Table`` batch).

    Give either ``checkpoint_uri`` (read from storage, once, here) or ``model`` (+ optional
    ``config`` for category ids). ``device`` defaults to CUDA when visible; ``amp`` (autocast to
    float16) defaults to on for CUDA. Detections below ``score_threshold`` are dropped.

    ``threads`` (CPU only) is how many cores the model may use; 0 leaves torch as it is (a Ray
    actor runs torch on as many OpenMP threads as CPUs it reserved, ``OMP_NUM_THREADS``). With
    ``threads`` = T > 1 a batch of B images is split into L = min(T, B) lanes of consecutive images
    run concurrently on Python threads (torch releases the GIL in its kernels), each lane on
    T // L intra-op threads. Lanes beat one batch on T OpenMP threads: 6.9 vs 6.1 images/s on 2
    idle cores, 6.4 vs 5.2 in a Ray actor beside the pipeline's other processes, which preempt
    one thread of an OpenMP team while the others wait at its barrier (benchmarks/RESULTS.md).
    """

    def __init__(
        self,
        checkpoint_uri: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        config: Any = None,
        device: str | torch.device | None = None,
        amp: bool | None = None,
        score_threshold: float = 0.0,
        model_id: str | None = None,
        threads: int = 0,
    ) -> None:
        if (checkpoint_uri is None) == (model is None):
            raise MaskrayError("Predictor needs exactly one of checkpoint_uri or model")
        if not isinstance(threads, int) or threads < 0:
            raise MaskrayError(f"threads {threads!r} must be an integer >= 0 (0 = leave torch's setting)")
        if checkpoint_uri is not None:
            model, config, model_id = load_model(checkpoint_uri)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.threads = threads if self.device.type == "cpu" else 0
        self._lanes: Any = None  # ThreadPoolExecutor for lanes 2..T, made on first use
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        self.model = _unwrap(model).to(self.device).eval()
        self.config = config
        self.model_id = model_id or ""
        self.score_threshold = float(score_threshold)
        if config is not None and hasattr(config, "category_ids"):
            self.category_ids = list(config.category_ids())
        else:
            num_classes = self.model.roi_heads.box_predictor.cls_score.out_features
            self.category_ids = list(range(1, num_classes))

    @property
    def min_size(self) -> int:
        """The resize target of the shorter side (the detector's eval ``min_size``); settable, so
        TTA can rescale it (``pipeline.pseudo``), and read by :meth:`predict` on every call."""
        return model_sizes(self.model)[0]

    @min_size.setter
    def min_size(self, value: int) -> None:
        self.model.transform.min_size = (int(value),)

    @property
    def max_size(self) -> int:
        """The cap on the longer side (the detector's ``max_size``); settable like ``min_size``."""
        return model_sizes(self.model)[1]

    @max_size.setter
    def max_size(self, value: int) -> None:
        self.model.transform.max_size = int(value)

    @property
    def transform(self) -> torch.nn.Module:
        """The detector's GeneralizedRCNNTransform (so TTA code that rescales ``min_size`` /
        ``max_size`` of ``model.transform`` works on a Predictor too)."""
        return self.model.transform

    # ---- the model on already-resized images

    def forward_resized(
        self, images: Sequence[torch.Tensor], original_sizes: Sequence[tuple[int, int]], *, cpu: bool = True
    ) -> list[dict[str, torch.Tensor]]:
        """Detections for float ``[3,h,w]`` images already resized by :func:`resize_for_model`.

        Returns per image ``boxes`` (xyxy in the ORIGINAL frame), ``labels``, ``scores`` and
        ``masks`` (``[N,1,M,M]`` mask probabilities, not yet pasted), keeping only scores >=
        ``score_threshold``; float32 tensors on the CPU (``cpu=False``: on the model's device).
        With ``threads`` > 1 the images run in lanes (see the class docstring); the outputs are in
        input order either way.
        """
        if not images:
            return []
        if not self.threads:
            return self._forward_lane(images, original_sizes, cpu, 0)
        lanes = min(self.threads, len(images))
        intra = max(1, self.threads // lanes)
        if lanes == 1:
            return self._forward_lane(images, original_sizes, cpu, intra)
        if self._lanes is None:
            from concurrent.futures import ThreadPoolExecutor

            self._lanes = ThreadPoolExecutor(max_workers=self.threads - 1, thread_name_prefix="maskray-lane")
        # Consecutive, near-equal chunks; lane 0 runs on the calling thread.
        bounds = [len(images) * k // lanes for k in range(lanes + 1)]
        futures = [self._lanes.submit(self._forward_lane, images[a:b], original_sizes[a:b], cpu, intra)
                   for a, b in zip(bounds[1:-1], bounds[2:])]
        try:
            outputs = self._forward_lane(images[:bounds[1]], original_sizes[:bounds[1]], cpu, intra)
        finally:
            # Every lane has finished before this returns or raises (a retry must not overlap).
            for f in futures:
                f.exception()
        for f in futures:
            outputs.extend(f.result())
        return outputs

    def _forward_lane(
        self, images: Sequence[torch.Tensor], original_sizes: Sequence[tuple[int, int]], cpu: bool, intra: int
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`forward_resized` of one lane, on the calling thread, with torch on ``intra``
        threads (0: as it is). Autocast, inference mode and, with OpenMP, the thread count are
        per thread, so they are set here."""
        from torchvision.models.detection.image_list import ImageList
        from torchvision.models.detection.transform import resize_boxes

        if intra and torch.get_num_threads() != intra:
            torch.set_num_threads(intra)
        model = self.model
        transform = model.transform
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.amp):
            tensors = [transform.normalize(img.to(self.device, non_blocking=True)) for img in images]
            sizes = [tuple(t.shape[-2:]) for t in tensors]
            batched = transform.batch_images(tensors, size_divisible=transform.size_divisible)
            image_list = ImageList(batched, sizes)
            features = model.backbone(image_list.tensors)
            if isinstance(features, torch.Tensor):
                features = {"0": features}
            proposals, _ = model.rpn(image_list, features)
            detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
        results = []
        for det, size, orig in zip(detections, sizes, original_sizes):
            keep = det["scores"] >= self.score_threshold
            out = {
                "boxes": resize_boxes(det["boxes"][keep].float(), size, tuple(orig)),
                "labels": det["labels"][keep],
                "scores": det["scores"][keep].float(),
                "masks": det["masks"][keep].float(),
            }
            results.append({k: v.cpu() for k, v in out.items()} if cpu else out)
        return results

    # ---- plain loop

    def predict(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """torchvision-style outputs for ``[3,H,W]`` images (uint8 or float [0,1]), each in its
        input's frame, masks pasted (``[N,1,H,W]`` probabilities), on the model's device, like
        ``model(images)`` in eval mode."""
        from torchvision.models.detection.roi_heads import paste_masks_in_image

        floats = [_to_float(img) for img in images]
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in floats]
        min_size, max_size = self.min_size, self.max_size  # read per call: TTA may rescale them
        resized = [resize_for_model(f, min_size, max_size) for f in floats]
        outputs = self.forward_resized(resized, sizes, cpu=False)
        for out, size in zip(outputs, sizes):
            out["masks"] = paste_masks_in_image(out["masks"], out["boxes"], size)
        return outputs

    # ---- Ray Data actor stage

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, (list, tuple)):
            return self.predict(batch)
        return self.process_batch(batch)

    def process_batch(self, table: Any) -> Any:
        """Ray Data stage: a decoded batch (columns of :func:`_preprocess`) -> the same keys,
        ``height``/``width``, ``error`` and ``pred`` (the pickled :meth:`forward_resized` output).

        A batch that fails as a whole is retried image by image so one bad image costs only
        its own row an ``error``.
        """
        import pyarrow as pa

        n = table.num_rows
        errors = table.column("error").to_pylist()
        heights = table.column("height").to_pylist()
        widths = table.column("width").to_pylist()
        rh = table.column("rheight").to_pylist()
        rw = table.column("rwidth").to_pylist()
        pixels = table.column("pixels")
        todo = [i for i in range(n) if errors[i] is None]
        images = {}
        for i in todo:
            buf = pixels[i].as_buffer()
            images[i] = torch.frombuffer(buf, dtype=torch.float32).view(3, rh[i], rw[i])
        preds: list[bytes | None] = [None] * n
        try:
            outs = self.forward_resized([images[i] for i in todo], [(heights[i], widths[i]) for i in todo])
            for i, out in zip(todo, outs):
                preds[i] = _pack(out)
        except Exception as exc:  # noqa: BLE001 - isolate the failing image(s)
            logger.warning("batch of %d failed (%s); retrying image by image", len(todo), _error_text(exc))
            self._release_memory()
            for i in todo:
                try:
                    preds[i] = _pack(self.forward_resized([images[i]], [(heights[i], widths[i])])[0])
                except Exception as exc_i:  # noqa: BLE001
                    errors[i] = f"inference failed: {_error_text(exc_i)}"
                    self._release_memory()
        self._after_batch(table)
        columns = {name: table.column(name) for name in ("shard", "row", "image_id", "file_name", "height", "width")}
        columns["error"] = pa.array(errors, pa.string())
        columns["pred"] = pa.array(preds, pa.large_binary())
        return pa.table(columns)

    def _after_batch(self, table: Any) -> None:
        """Hook after a batch ran and before its rows are returned (tests inject faults here)."""

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _pack(out: dict[str, torch.Tensor]) -> bytes:
    return pickle.dumps({k: v.numpy() for k, v in out.items()}, protocol=5)


def predict_images(
    model: torch.nn.Module | Predictor,
    images: Sequence[torch.Tensor],
    *,
    transforms: Callable[[Callable, Sequence[torch.Tensor]], Any] | None = None,
    score_threshold: float = 0.0,
    device: str | torch.device | None = None,
    amp: bool | None = None,
) -> Any:
    """Predictions for ``images`` in their own frames (see :meth:`Predictor.predict`), through the
    ``transforms`` TTA hook when given (``transforms(predict_fn, images)``)."""
    predictor = model if isinstance(model, Predictor) else Predictor(
        model=model, device=device, amp=amp, score_threshold=score_threshold)
    if transforms is None:
        return predictor.predict(images)
    return transforms(predictor.predict, images)


# --------------------------------------------------------------------------- CPU stages


def _read_rows(batch: Any, *, columns: Sequence[str]) -> Any:
    """Ray Data stage: work units ``{"shard", "uri", "start", "stop", "total"}`` -> rows
    ``start..stop-1`` of each shard, tagged with their key ``(shard, row)``.

    Units are bounded row ranges (not whole shards) so every task is short: a long-lived read
    task would hold its CPU while backpressured and starve the post-processing tasks of a
    small node, and one big shard is decoded by many tasks in parallel. Only the row groups
    overlapping the range are read (shards are written with 64-row groups).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage

    tables = []
    for unit in batch.to_pylist():
        fs, path = storage.resolve(unit["uri"])
        start, stop = int(unit["start"]), int(unit["stop"])
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            if parquet.metadata.num_rows != unit["total"]:
                raise MaskrayError(f"shard {unit['uri']} has {parquet.metadata.num_rows} rows but the manifest "
                                   f"says {unit['total']}; the dataset is inconsistent")
            groups, first, offset = [], None, 0
            for g in range(parquet.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if offset < stop and offset + n > start:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            table = parquet.read_row_groups(groups, columns=list(columns)).slice(start - first, stop - start)
        table = table.append_column("shard", pa.array([unit["shard"]] * table.num_rows, pa.string()))
        table = table.append_column("row", pa.array(np.arange(start, stop, dtype=np.int64)))
        tables.append(table)
    return pa.concat_tables(tables)


def _decode(data: bytes | None, max_pixels: int | None) -> torch.Tensor:
    """``pipeline.dataset.decode_image`` (gray/RGBA/16-bit -> 3 x uint8; raises one line for
    empty, corrupt, truncated or over-``max_pixels`` data, before allocating pixels)."""
    from pipeline.dataset import decode_image

    return decode_image(data, max_pixels=max_pixels)


def _preprocess(table: Any, *, min_size: int, max_size: int, max_pixels: int | None) -> Any:
    """Ray Data stage: encoded ``image`` bytes -> resized float32 ``pixels`` (raw bytes of a
    ``[3, rheight, rwidth]`` tensor), the original ``height``/``width``, and ``error``."""
    import pyarrow as pa

    images = table.column("image")
    n = table.num_rows
    heights, widths, rheights, rwidths, pixels, errors = [], [], [], [], [], []
    for i in range(n):
        stage = "decode"
        try:
            image = _decode(images[i].as_py(), max_pixels)
            h, w = int(image.shape[-2]), int(image.shape[-1])
            stage = "resize"
            resized = resize_for_model(_to_float(image), min_size, max_size).contiguous()
            if min(resized.shape[-2:]) < 1:
                raise MaskrayError(f"a {w}x{h} image resizes to {resized.shape[-1]}x{resized.shape[-2]}")
            heights.append(h)
            widths.append(w)
            rheights.append(int(resized.shape[-2]))
            rwidths.append(int(resized.shape[-1]))
            pixels.append(resized.numpy().tobytes())
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - a bad image is an error row, never a crash
            heights.append(0)
            widths.append(0)
            rheights.append(0)
            rwidths.append(0)
            pixels.append(b"")
            errors.append(f"{stage} failed: {_error_text(exc)}")
    columns = {name: table.column(name) for name in ("shard", "row", "image_id", "file_name")}
    columns["height"] = pa.array(heights, pa.int32())
    columns["width"] = pa.array(widths, pa.int32())
    columns["rheight"] = pa.array(rheights, pa.int32())
    columns["rwidth"] = pa.array(rwidths, pa.int32())
    columns["pixels"] = pa.array(pixels, pa.large_binary())
    columns["error"] = pa.array(errors, pa.string())
    return pa.table(columns)


def _instance_type():
    from pipeline.format import RESULT_SCHEMA

    return RESULT_SCHEMA.field("instances").type


def to_instances(
    boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray,
    height: int, width: int, category_ids: Sequence[int], image_id: int = 0,
) -> list[dict]:
    """Low-resolution mask probabilities + boxes (xyxy, original frame) -> result instances
    (COCO xywh ``bbox``, ``category_id``, ``score``, compressed RLE ``segmentation`` with bytes
    ``counts``), via ``pipeline.instances`` (masks pasted at the image size, binarized at 0.5)."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from pipeline.instances import Instances

    if len(scores) == 0:
        return []
    boxes_t = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32))
    masks_t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))
    size = (int(height), int(width))
    pasted = paste_masks_in_image(masks_t, boxes_t, size)
    output = {"boxes": boxes_t, "scores": torch.from_numpy(np.asarray(scores, dtype=np.float32)),
              "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)), "masks": pasted}
    instances = []
    for item in Instances.from_output(output, size).to_coco(image_id, category_ids):
        seg = item["segmentation"]
        counts = seg["counts"]
        instances.append({
            "category_id": item["category_id"],
            "score": item["score"],
            "bbox": item["bbox"],
            "segmentation": {"size": [int(v) for v in seg["size"]],
                             "counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts)},
        })
    return instances


def _postprocess(table: Any, *, category_ids: Sequence[int]) -> Any:
    """Ray Data stage: packed predictions -> result rows (``instances`` as RESULT_SCHEMA), keyed."""
    import pyarrow as pa

    n = table.num_rows
    errors = table.column("error").to_pylist()
    heights = table.column("height").to_pylist()
    widths = table.column("width").to_pylist()
    preds = table.column("pred")
    image_ids = table.column("image_id").to_pylist()
    instances: list[list[dict]] = []
    for i in range(n):
        if errors[i] is not None:
            instances.append([])
            continue
        try:
            p = pickle.loads(preds[i].as_py())
            instances.append(to_instances(p["boxes"], p["labels"], p["scores"], p["masks"],
                                          heights[i], widths[i], category_ids, image_ids[i]))
        except Exception as exc:  # noqa: BLE001
            errors[i] = f"post-processing failed: {_error_text(exc)}"
            instances.append([])
    columns = {name: table.column(name) for name in ("shard", "row", "image_id", "file_name")}
    columns["instances"] = pa.array(instances, _instance_type())
    columns["error"] = pa.array(errors, pa.string())
    return pa.table(columns)


# --------------------------------------------------------------------------- driver


@dataclasses.dataclass
class InferenceSummary:
    """What one ``run_inference`` call did (counts cover the shards processed in this run)."""

    images: int = 0
    errors: int = 0
    instances: int = 0
    seconds: float = 0.0
    shards_done: int = 0
    shards_skipped: int = 0
    images_skipped: int = 0
    coco_json: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"images: {self.images}  errors: {self.errors}  instances: {self.instances}  "
                f"images/s: {self.images_per_second:.2f}  wall time: {self.seconds:.1f} s  "
                f"(shards: {self.shards_done} done, {self.shards_skipped} skipped)")


def shard_name(shard_path: str) -> str:
    return shard_path.rstrip("/").rsplit("/", 1)[-1]


def result_uri(output_uri: str, shard_path: str) -> str:
    """The results file of one input shard: same file name, under ``output_uri``."""
    from pipeline import storage

    return storage.join(output_uri, shard_name(shard_path))


def _complete_rows(uri: str) -> int | None:
    """Row count of an existing results file, or None when absent or unreadable."""
    import pyarrow.parquet as pq

    from pipeline import storage

    if not storage.exists(uri):
        return None
    try:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - an unreadable file is recomputed
        logger.warning("results file %s is unreadable (%s); recomputing it", uri, _error_text(exc))
        return None


def _commit(uri: str, pieces: list[Any], model_id: str) -> tuple[int, int, int]:
    """Write one shard's results atomically; returns ``(rows, errors, instances)``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.format import RESULT_SCHEMA

    table = pa.concat_tables(pieces).sort_by("row") if pieces else None
    n = table.num_rows if table is not None else 0
    columns = {}
    for field in RESULT_SCHEMA:
        if field.name == "model":
            columns["model"] = pa.array([model_id] * n, field.type)
        elif table is not None:
            columns[field.name] = table.column(field.name).cast(field.type)
        else:
            columns[field.name] = pa.array([], field.type)
    result = pa.table(columns, schema=RESULT_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(result, sink)
    storage.write_bytes(uri, sink.getvalue())
    errors = n - int(pc.sum(pc.is_null(result.column("error"))).as_py() or 0) if n else 0
    instances = int(pc.sum(pc.list_value_length(result.column("instances"))).as_py() or 0) if n else 0
    return n, errors, instances


def _shard_list(dataset_uri: str) -> list[tuple[str, str, int]]:
    """``[(shard file name, shard uri, images)]`` from the dataset's manifest."""
    from pipeline.format import read_manifest, shard_uris

    manifest = read_manifest(dataset_uri)
    uris = shard_uris(dataset_uri, manifest)
    shards = [(shard_name(info.path), uri, int(info.images)) for info, uri in zip(manifest.shards, uris)]
    names = [s[0] for s in shards]
    if len(set(names)) != len(names):
        raise MaskrayError(f"dataset {dataset_uri}: the manifest lists two shards with the same file name, "
                           "which would share one results file")
    return shards


def cpu_actor_threads(node_cpus: Sequence[float], actors: int) -> int:
    """Threads (``Predictor(threads=)``) for each of ``actors`` CPU model actors on nodes with
    ``node_cpus``.

    The model is the pipeline's bottleneck on CPU: decode/resize and RLE are a small share of the
    work per image, so each actor gets the cluster's CPUs shared out among the actors (at least
    1, at most the largest node's), although Ray reserves fewer for it so the light CPU tasks
    can still be scheduled. Measured in benchmarks/RESULTS.md (Inference).
    """
    if actors < 1:
        raise MaskrayError(f"actors {actors} must be >= 1")
    cpus = [c for c in node_cpus if c > 0]
    if not cpus:
        return 1
    return max(1, min(int(max(cpus)), int(sum(cpus) // actors)))


def run_inference(
    dataset_uri: str,
    output_uri: str,
    checkpoint_uri: str,
    *,
    batch_size: int = 4,
    actors: int | tuple[int, int] = 1,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    threads: int | None = None,
    score_threshold: float = 0.05,
    coco_json: str | None = None,
    predictor_factory: type[Predictor] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    rows_per_task: int = 64,
    on_shard_committed: Callable[[str], None] | None = None,
) -> InferenceSummary:
    """Segment every image of the shards under ``dataset_uri`` into per-shard results files under
    ``output_uri`` (see the module docstring for the stages and the exactly-once invariant).

    ``actors`` is a pool size or ``(min, max)``; ``gpus_per_actor`` None = 1 when the cluster has
    GPUs, else CPU actors. ``cpus_per_actor`` None = 1, lowered on a CPU-only cluster so the pool
    leaves one CPU for the decode and RLE tasks (else they could never be scheduled). ``threads``
    is the cores each CPU actor's :class:`Predictor` uses (its batches split in lanes); None =
    :func:`cpu_actor_threads` (the cluster's CPUs shared among the actors), 0 = Ray's default
    (torch on the actor's reserved CPUs, so 1); GPU actors ignore it. Images over ``max_pixels`` (None: no limit) become error rows.
    ``rows_per_task`` bounds the rows one read/decode task takes (match the shards' row groups).
    ``on_shard_committed(result_uri)`` is called after each commit.
    Initialises Ray (local) when it is not running.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if not isinstance(batch_size, int) or batch_size < 1:
        raise MaskrayError(f"batch size {batch_size!r} must be a positive integer")
    if not isinstance(rows_per_task, int) or rows_per_task < 1:
        raise MaskrayError(f"rows per task {rows_per_task!r} must be a positive integer")
    if not 0.0 <= score_threshold <= 1.0:
        raise MaskrayError(f"score threshold {score_threshold} must be in [0, 1]")
    if threads is not None and (not isinstance(threads, int) or threads < 0):
        raise MaskrayError(f"threads {threads!r} must be an integer >= 0 (0 = Ray's default)")
    started = time.perf_counter()
    shards = _shard_list(dataset_uri)
    summary = InferenceSummary()
    pending: dict[str, tuple[str, int]] = {}
    for name, uri, count in shards:
        out = result_uri(output_uri, name)
        rows = _complete_rows(out)
        if rows == count:
            summary.shards_skipped += 1
            summary.images_skipped += count
            continue
        if rows is not None:
            logger.warning("results file %s has %d rows, the shard has %d; recomputing it", out, rows, count)
        pending[name] = (uri, count)
    logger.info("%d shards to process, %d already done", len(pending), summary.shards_skipped)

    def committed(name: str, pieces: list[Any]) -> None:
        out = result_uri(output_uri, name)
        rows, errors, instances = _commit(out, pieces, model_id)
        summary.images += rows
        summary.errors += errors
        summary.instances += instances
        summary.shards_done += 1
        logger.info("committed %s (%d rows, %d errors, %d instances)", out, rows, errors, instances)
        if on_shard_committed is not None:
            on_shard_committed(out)

    if pending:
        # The driver reads the config (sizes, categories) once; actors load the weights themselves.
        model, config, model_id = load_model(checkpoint_uri)
        min_size, max_size = model_sizes(model)
        category_ids = list(config.category_ids())
        del model
        for name in [n for n, (_, count) in pending.items() if count == 0]:
            committed(name, [])
            del pending[name]
    if pending:
        if not ray.is_initialized():
            from pipeline import raysetup

            raysetup.init()
        resources = ray.cluster_resources()
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        max_actors = actors[1] if isinstance(actors, tuple) else int(actors)
        if cpus_per_actor is None:
            cpus_per_actor = 1.0
            spare = float(resources.get("CPU", 0)) - 1.0
            if not gpus_per_actor and spare > 0 and max_actors * cpus_per_actor > spare:
                cpus_per_actor = max(0.1, spare / max_actors)
        if gpus_per_actor:
            threads = 0
        elif threads is None:
            threads = cpu_actor_threads(
                [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")], max_actors)
        logger.info("model actors: %s x (%.2f CPU, %.2f GPU, %s torch threads), batch size %d",
                    actors, cpus_per_actor, gpus_per_actor, threads or "default", batch_size)
        compute = (ActorPoolStrategy(min_size=actors[0], max_size=actors[1]) if isinstance(actors, tuple)
                   else ActorPoolStrategy(size=int(actors)))
        factory = predictor_factory or Predictor
        units = [{"shard": name, "uri": uri, "start": begin, "stop": min(begin + rows_per_task, count),
                  "total": count}
                 for name, (uri, count) in pending.items() for begin in range(0, count, rows_per_task)]
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.map_batches(_read_rows, batch_size=1, batch_format="pyarrow", fn_kwargs={"columns": READ_COLUMNS})
        # batch_size=None: decode the unit's rows in the task that read them. (An integer here
        # would apply to the fused read's input, the units, and bundle several units per task:
        # coarse tasks and an actor input bundle spanning shards, so commits only at the end.)
        ds = ds.map_batches(_preprocess, batch_size=None, batch_format="pyarrow",
                            fn_kwargs={"min_size": min_size, "max_size": max_size, "max_pixels": max_pixels})
        with warnings.catch_warnings():
            # Ray 2.60 warns that **ray_remote_args are deprecated (removal planned for 2.64).
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            ds = ds.map_batches(
                factory, batch_size=batch_size, batch_format="pyarrow", compute=compute,
                num_gpus=gpus_per_actor, num_cpus=cpus_per_actor,
                fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "score_threshold": score_threshold,
                                       "threads": threads},
                # Ray Data's defaults for actor pools, stated because exactly-once relies on them: a
                # dead actor is restarted and its batch retried (duplicates are dropped on the
                # driver). Being explicit also keeps decode in CPU tasks (ops whose remote args
                # differ are not fused into the actor).
                max_restarts=-1, max_task_retries=-1,
            )
        ds = ds.map_batches(_postprocess, batch_size=None, batch_format="pyarrow",
                            fn_kwargs={"category_ids": category_ids})
        _stream_and_commit(ds, pending, committed)

    summary.seconds = time.perf_counter() - started
    if coco_json is not None:
        write_coco_json(output_uri, [name for name, _, _ in shards], coco_json)
        summary.coco_json = coco_json
    return summary


class ShardCollector:
    """Groups streamed result rows by shard and commits each shard exactly once.

    Rows are keyed ``(shard, row)``. A key seen before (a batch retried after an actor died), or
    a row of a shard already committed, is dropped; a shard is handed to ``commit(name, pieces)``
    as soon as it holds every row index ``0..count-1``, and never again. :meth:`finish` raises
    if any shard is still incomplete when the stream ends.
    """

    def __init__(self, counts: dict[str, int], commit: Callable[[str, list[Any]], None]) -> None:
        self.counts = dict(counts)
        self.commit = commit
        self.seen: dict[str, set[int]] = {name: set() for name in counts}
        self.pieces: dict[str, list[Any]] = {name: [] for name in counts}
        self.committed: set[str] = set()
        self.duplicates = 0

    def add(self, batch: Any) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        for name in pc.unique(batch.column("shard")).to_pylist():
            if name in self.committed:
                self.duplicates += int(pc.sum(pc.equal(batch.column("shard"), name)).as_py())
                continue
            if name not in self.seen:
                raise MaskrayError(f"inference returned rows of unknown shard {name!r}")
            part = batch.filter(pc.equal(batch.column("shard"), name))
            seen, count = self.seen[name], self.counts[name]
            keep = []
            for k, row in enumerate(part.column("row").to_pylist()):
                if row in seen:
                    self.duplicates += 1
                    continue
                if not 0 <= row < count:
                    raise MaskrayError(f"shard {name} has more rows than the manifest's {count}")
                seen.add(row)
                keep.append(k)
            if len(keep) < part.num_rows:
                part = part.take(pa.array(keep, pa.int64()))
            if part.num_rows:
                self.pieces[name].append(part)
            if len(seen) == count:
                pieces = self.pieces.pop(name)
                del self.seen[name]
                self.committed.add(name)
                self.commit(name, pieces)

    def finish(self) -> None:
        if self.duplicates:
            logger.info("dropped %d duplicate rows (retried batches)", self.duplicates)
        if self.seen:
            missing = ", ".join(f"{name} ({len(rows)}/{self.counts[name]} rows)"
                                for name, rows in sorted(self.seen.items()))
            raise MaskrayError(f"inference ended with incomplete shards: {missing}; rerun to finish them")


def _stream_and_commit(ds: Any, pending: dict[str, tuple[str, int]],
                       committed: Callable[[str, list[Any]], None]) -> None:
    """Pull result rows as they stream and commit each shard once all its rows have arrived."""
    collector = ShardCollector({name: count for name, (_, count) in pending.items()}, committed)
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for batch in batches:
            collector.add(batch)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops the streaming executor at once when a commit (or the caller) raised
    collector.finish()


def write_coco_json(output_uri: str, shard_names: Sequence[str], json_uri: str) -> int:
    """COCO results JSON (a list of ``{image_id, category_id, bbox, score, segmentation}``) from
    the committed results files, for ``pycocotools.COCO.loadRes``; returns the instance count."""
    import pyarrow.parquet as pq

    from pipeline import storage

    parts = []
    count = 0
    for name in shard_names:
        uri = result_uri(output_uri, name)
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["image_id", "instances"])
        for image_id, instances in zip(table.column("image_id").to_pylist(), table.column("instances").to_pylist()):
            for inst in instances or []:
                seg = inst["segmentation"]
                parts.append(json.dumps({
                    "image_id": int(image_id),
                    "category_id": int(inst["category_id"]),
                    "bbox": [round(float(v), 3) for v in inst["bbox"]],
                    "score": round(float(inst["score"]), 5),
                    "segmentation": {"size": [int(v) for v in seg["size"]],
                                     "counts": seg["counts"].decode("ascii")},
                }))
                count += 1
    storage.write_bytes(json_uri, ("[" + ",\n".join(parts) + "]\n").encode())
    if not count:
        logger.warning("%s holds no instances (pycocotools COCO.loadRes cannot load an empty list)", json_uri)
    return count
