"""The model on one device: :class:`Predictor` (plain loop and Ray Data model stage) and
:func:`load_model` (:func:`read_model_config`: config and digest only). Imports neither Ray nor
storage at module level (the GPU check script and unit tests use it without Ray).

``Predictor(checkpoint_uri=None, *, model=None, config=None, device=None, amp=None, score_threshold=0.0, threads=0)``
    ``predict(images)``: ``[3,H,W]`` images (uint8, or float in [0,1]) -> torchvision-style
    output dicts in each input's frame (``masks`` pasted, float ``[N,1,H,W]``), like
    ``model(images)``; fine for small images, O(N*H*W) memory. A keypoint model's outputs carry
    ``keypoints`` float ``[N,K,3]``: ``(x, y, score)`` per keypoint in the image's frame, the
    score being torchvision's ``keypoints_scores`` (the heatmap logit at the point, where
    torchvision puts a constant v = 1; visibility follows from it: ``model.keypoint_heads``).
    The keypoint head predicts for every detection whatever its class; where the config's
    categories name keypoints for some categories only, detections of the others get rows of
    NaN (``keypoint_labels``), which results store as no keypoints.
    ``segment(images)``: the bounded path: per image a list of result instances (RLE pasted one
    instance at a time within its box, :mod:`pipeline.infer.paste`).
    ``forward_uint8(images)``: uint8 ``[3,H,W]`` at the original size -> boxes in the original
    frame + low-resolution mask probabilities; the conversion to float, resize and normalize run
    on the model's device (what the Ray Data model stage ships: uint8, never float32).
    ``run_units(table)``: the Ray Data model stage's computation (decoded units -> per-unit dicts of
    numpy predictions, handed to the writer in the same actor); ``predictor(table)`` /
    :meth:`process_units`: the same as a table with pickled predictions.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.checkpoint import unwrap
from model.errors import MaskrayError, error_text

logger = logging.getLogger(__name__)


PREPARE_BATCH_PIXELS = 2**22  # images prepared together (forward_uint8): at most this many pixels in all


def to_float(image: torch.Tensor) -> torch.Tensor:
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
    """Resize a float ``[3,H,W]`` image, or a batch ``[N,3,H,W]`` of one size, exactly as
    torchvision's GeneralizedRCNNTransform does in eval mode (shorter side to ``min_size``, longer
    side at most ``max_size``, bilinear; the same ``interpolate`` call as its
    ``_resize_image_and_masks``, bit for bit, per image: unit-tested). Written here so the model
    stage's pre-processing does not import torchvision (~1.8 s of one core per process); the model
    itself does when it is built.

    An image whose size the rule keeps is returned as it is: ``interpolate`` at an unchanged size
    samples every pixel at its own centre (weights 1 and 0), so its output equals its input."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
    if (math.floor(h * scale), math.floor(w * scale)) == (h, w):  # interpolate's own output size
        return image
    batch = image if image.dim() == 4 else image[None]
    out = torch.nn.functional.interpolate(batch, size=None, scale_factor=scale, mode="bilinear",
                                          recompute_scale_factor=True, align_corners=False)
    return out if image.dim() == 4 else out[0]


def load_model(checkpoint_uri: str) -> tuple[torch.nn.Module, Any, str]:
    """``(model, config, model_id)`` from any model source (:mod:`pipeline.weights`: a maskray
    checkpoint or torchvision state dict at a storage URI, or a ``torchvision:`` name)."""
    from pipeline.weights import load_model as load_any

    model, config, _, source = load_any(checkpoint_uri)
    return model, config, source.model_id


def read_model_config(checkpoint_uri: str) -> tuple[Any, str]:
    """``(config, model_id)`` of a model source without building its model (what a driver needs:
    sizes, categories, digest)."""
    from pipeline.weights import read_model

    config, _, _, source = read_model(checkpoint_uri)
    return config, source.model_id


def optimize_for_inference(model: torch.nn.Module, device: torch.device) -> None:
    """Same outputs up to float rounding, less work: every eval-mode norm after a conv folded into
    it (:func:`model.inference.fold_batchnorm`, -15 % of a CPU forward of R50-FPN v2 at 800 px),
    and on CPU channels-last weights (oneDNN's preferred layout: -3 %). benchmarks/RESULTS.md."""
    from model.inference import fold_batchnorm

    fold_batchnorm(model)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- predictor


class Predictor:
    """A Mask R-CNN ready for inference on one device; the same object serves a plain loop
    (:meth:`predict`) and a Ray Data actor (``__call__`` with a ``pyarrow.Table`` batch).

    Give either ``checkpoint_uri`` (read from storage, once, here) or ``model`` (+ optional
    ``config`` for category ids). ``device`` defaults to CUDA when visible; ``amp`` (autocast to
    float16) defaults to on for CUDA. Detections below ``score_threshold`` are dropped.

    ``optimize`` (default: when the model was loaded here from ``checkpoint_uri``, as in the Ray
    Data model stage) rewrites the model for inference in place (:func:`optimize_for_inference`);
    a ``model`` passed in is left as it is unless ``optimize=True``.

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
        batch_size: int = 4,
        optimize: bool | None = None,
    ) -> None:
        if (checkpoint_uri is None) == (model is None):
            raise MaskrayError("Predictor needs exactly one of checkpoint_uri or model")
        if not isinstance(threads, int) or threads < 0:
            raise MaskrayError(f"threads {threads!r} must be an integer >= 0 (0 = leave torch's setting)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MaskrayError(f"batch size {batch_size!r} must be a positive integer")
        self.batch_size = batch_size  # images per model call in process_units
        if checkpoint_uri is not None:
            model, config, model_id = load_model(checkpoint_uri)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.threads = threads if self.device.type == "cpu" else 0
        self._lanes: Any = None  # ThreadPoolExecutor for lanes 2..T, made on first use
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        self.model = unwrap(model).to(self.device).eval()
        if optimize if optimize is not None else checkpoint_uri is not None:
            optimize_for_inference(self.model, self.device)
        self.config = config
        self.model_id = model_id or ""
        self.score_threshold = float(score_threshold)
        if config is not None and hasattr(config, "category_ids"):
            self.category_ids = list(config.category_ids())
        else:
            num_classes = self.model.roi_heads.box_predictor.cls_score.out_features
            self.category_ids = list(range(1, num_classes))
        # Labels never reported (torchvision's COCO "N/A" slots): dropped with the score threshold.
        self.unused_labels = list(config.unused_labels()) if hasattr(config, "unused_labels") else []
        self.keypoint_labels = keypoint_labels(config)

    @property
    def min_size(self) -> int:
        """The resize target of the shorter side (the detector's eval ``min_size``); settable, so
        TTA can rescale it (``pipeline.distill.tta``), and read by :meth:`predict` on every call."""
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
        """Detections for float ``[3,h,w]`` images already normalized (the model's mean/std) and
        then resized by :func:`resize_for_model`, torchvision's order (:meth:`prepare`).

        Returns per image ``boxes`` (xyxy in the ORIGINAL frame), ``labels``, ``scores``, for a
        mask model ``masks`` (``[N,1,M,M]`` mask probabilities, not yet pasted) and for a keypoint
        model ``keypoints`` (``[N,K,3]``: x, y in the ORIGINAL frame, as torchvision's
        ``resize_keypoints``, and the keypoint's score), keeping only scores >= ``score_threshold``
        and labels the config reports (not its ``unused_labels``); float32 tensors on the CPU
        (``cpu=False``: on the model's device).
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
        from torchvision.models.detection.transform import resize_boxes, resize_keypoints

        if intra and torch.get_num_threads() != intra:
            torch.set_num_threads(intra)
        model = self.model
        transform = model.transform
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.amp):
            tensors = [img.to(self.device, non_blocking=True) for img in images]
            sizes = [tuple(t.shape[-2:]) for t in tensors]
            batched = transform.batch_images(tensors, size_divisible=transform.size_divisible)
            image_list = ImageList(batched, sizes)
            features = model.backbone(image_list.tensors)
            if isinstance(features, torch.Tensor):
                features = {"0": features}
            proposals, _ = model.rpn(image_list, features)
            detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
        results = []
        unused = torch.tensor(self.unused_labels, dtype=torch.int64, device=self.device)
        for det, size, orig in zip(detections, sizes, original_sizes):
            keep = (det["scores"] >= self.score_threshold) & ~torch.isin(det["labels"], unused)
            out = {
                "boxes": resize_boxes(det["boxes"][keep].float(), size, tuple(orig)),
                "labels": det["labels"][keep],
                "scores": det["scores"][keep].float(),
            }
            if "masks" in det:
                out["masks"] = det["masks"][keep].float()
            if "keypoints" in det:  # (x, y, 1) -> (x, y, score), x and y in the original frame
                points = resize_keypoints(det["keypoints"][keep].float(), size, tuple(orig))
                out["keypoints"] = torch.cat([points[..., :2], det["keypoints_scores"][keep].float()[..., None]], -1)
                if self.keypoint_labels is not None:  # categories without keypoints: NaN rows (none)
                    named = torch.tensor(self.keypoint_labels, dtype=torch.int64, device=self.device)
                    out["keypoints"][~torch.isin(out["labels"], named)] = float("nan")
            results.append({k: v.cpu() for k, v in out.items()} if cpu else out)
        return results

    # ---- plain loop

    def predict(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """torchvision-style outputs for ``[3,H,W]`` images (uint8 or float [0,1]), each in its
        input's frame, masks pasted (``[N,1,H,W]`` probabilities), on the model's device, like
        ``model(images)`` in eval mode; keypoints as ``(x, y, score)`` (:meth:`forward_resized`)."""
        from torchvision.models.detection.roi_heads import paste_masks_in_image

        floats = [to_float(img) for img in images]
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in floats]
        outputs = self.forward_resized([self.prepare(f) for f in floats], sizes, cpu=False)
        for out, size in zip(outputs, sizes):
            if "masks" in out:
                out["masks"] = paste_masks_in_image(out["masks"], out["boxes"], size)
        return outputs

    # ---- bounded outputs and the Ray Data model stage

    def forward_uint8(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """:meth:`forward_resized` for uint8 ``[3,H,W]`` images at their original size (float
        images in [0,1] are taken too): each is moved to the model's device first, then made
        float, normalized and resized there (:meth:`prepare`). Consecutive images of one size and
        dtype are prepared as one ``[N,3,H,W]`` batch of at most :data:`PREPARE_BATCH_PIXELS`
        pixels (the same values as one by one: every op is per image; a few tensor ops per batch
        instead of per image, most of the cost for small images; a 12-MP photo is prepared alone,
        so its float copies, ~290 MB, are never held for several photos at once)."""
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        resized: list[torch.Tensor] = []
        start = 0
        for end in range(1, len(images) + 1):
            if (end < len(images) and sizes[end] == sizes[start] and images[end].dtype == images[start].dtype
                    and (end - start + 1) * sizes[start][0] * sizes[start][1] <= PREPARE_BATCH_PIXELS):
                continue
            if min(sizes[start]) < 1:
                raise MaskrayError(f"a {sizes[start][1]}x{sizes[start][0]} image is empty")
            moved = [im.to(self.device, non_blocking=True) for im in images[start:end]]
            batch = moved[0][None] if len(moved) == 1 else torch.stack(moved)  # one image: a view, no copy
            resized.extend(self.prepare(to_float(batch)).unbind(0))
            start = end
        return self.forward_resized(resized, sizes)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """A float ``[3,H,W]`` image in [0,1] (or a batch ``[N,3,H,W]`` of one size) as the model's
        input: normalized by its mean/std, then resized (:func:`resize_for_model` at the current
        ``min_size``/``max_size``, read per call: TTA may rescale them), in torchvision's
        GeneralizedRCNNTransform order, so outputs match ``model(images)`` to float rounding."""
        transform = self.model.transform
        mean = torch.as_tensor(transform.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(transform.image_std, dtype=image.dtype, device=image.device)
        return resize_for_model((image - mean[:, None, None]) / std[:, None, None], self.min_size, self.max_size)

    def segment(self, images: Sequence[torch.Tensor]) -> list[list[dict]]:
        """Per image, result instances (RESULT_SCHEMA ``instances``: COCO xywh ``bbox``,
        ``category_id``, ``score``, RLE ``segmentation`` with bytes ``counts``), pasted one instance
        at a time within its box: memory O(one box), never O(N*H*W)."""
        from pipeline.results import to_result_instances

        outs = self.forward_uint8(images) if images else []
        return [to_result_instances(o["boxes"], o["labels"].numpy(), o["scores"].numpy(), o.get("masks"),
                                    int(im.shape[-2]), int(im.shape[-1]), self.category_ids,
                                    keypoints=o.get("keypoints"))
                for o, im in zip(outs, images)]

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, (list, tuple)):
            return self.predict(batch)
        return self.process_units(batch)

    def process_units(self, table: Any, batch_size: int | None = None) -> Any:
        """Decoded units (one row per unit, :mod:`pipeline.infer.stages`) -> the same rows with
        ``preds`` (per image the pickled :meth:`forward_uint8` output, or null) and ``model``
        (this predictor's model id): :meth:`run_units` as a table that can cross processes."""
        import pyarrow as pa

        units = self.run_units(table, batch_size)
        keep = [n for n in table.column_names if n not in ("pixels", "errors")]
        out = table.select(keep)
        out = out.append_column("errors", pa.array([u["errors"] for u in units], pa.list_(pa.string())))
        preds = [[None if p is None else pack(p) for p in u["preds"]] for u in units]
        out = out.append_column("preds", pa.array(preds, pa.list_(pa.large_binary())))
        return out.append_column("model", pa.array([self.model_id] * table.num_rows, pa.string()))

    def run_units(self, table: Any, batch_size: int | None = None) -> list[dict]:
        """Decoded units -> per unit a dict of its columns (``pixels`` dropped) with ``errors``
        updated, ``preds`` (per image the :meth:`forward_uint8` output as numpy arrays, or None)
        and ``model``. Images run ``batch_size`` at a time (default ``self.batch_size``); a batch
        that fails as a whole is retried image by image so one bad image costs only its own row
        an ``error``."""
        size = int(batch_size or getattr(self, "batch_size", 4))
        units = []
        for u in range(table.num_rows):
            heights = table.column("heights")[u].as_py()
            widths = table.column("widths")[u].as_py()
            errors = table.column("errors")[u].as_py()
            pixels = table.column("pixels")[u].values
            todo = [i for i, e in enumerate(errors) if e is None]
            preds: list[dict | None] = [None] * len(errors)
            for start in range(0, len(todo), size):
                chunk = todo[start:start + size]
                ims = [torch.frombuffer(pixels[i].as_buffer(), dtype=torch.uint8).view(3, heights[i], widths[i])
                       for i in chunk]
                try:
                    for i, out in zip(chunk, self.unit_predictions(ims)):
                        preds[i] = out
                except Exception as exc:  # noqa: BLE001 - isolate the failing image(s)
                    logger.warning("batch of %d failed (%s); retrying image by image", len(chunk), error_text(exc))
                    self._release_memory()
                    for i, im in zip(chunk, ims):
                        try:
                            preds[i] = self.unit_predictions([im])[0]
                        except Exception as exc_i:  # noqa: BLE001
                            errors[i] = f"inference failed: {error_text(exc_i)}"
                            self._release_memory()
            unit = {n: table.column(n)[u].as_py() for n in table.column_names if n not in ("pixels", "errors")}
            units.append(dict(unit, errors=errors, preds=preds, model=self.model_id))
        self._after_batch(table)
        return units

    def unit_predictions(self, images: Sequence[torch.Tensor]) -> list[dict]:
        """What :meth:`run_units` keeps per image: the :meth:`forward_uint8` outputs as numpy arrays.
        A subclass may return ``{"instances": [...]}`` instead, ready result instances the writer
        stores as they are (``pipeline.distill.tta.TTAPredictor``)."""
        return [to_numpy(out) for out in self.forward_uint8(images)]

    def _after_batch(self, table: Any) -> None:
        """Hook after a unit ran and before its rows are returned (tests inject faults here)."""

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def keypoint_labels(config: Any) -> list[int] | None:
    """Labels (1..K) whose category names keypoints (COCO ``keypoints``), when the config's
    categories name them for some categories only; None when every detection's keypoints are
    reported (all name them, none does, or no config)."""
    categories = list(getattr(config, "categories", None) or [])
    named = [label for label, c in enumerate(categories, start=1) if c.get("keypoints")]
    return named if named and len(named) < len(categories) else None


def to_numpy(out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A :meth:`Predictor.forward_resized` output as numpy arrays."""
    return {k: v.numpy() for k, v in out.items()}


def pack(out: dict[str, np.ndarray]) -> bytes:
    """A :func:`to_numpy` output as bytes (pickle 5)."""
    return pickle.dumps(out, protocol=5)


def unpack(data: bytes) -> dict[str, np.ndarray]:
    return pickle.loads(data)
