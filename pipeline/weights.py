"""Model files by URI or by torchvision name: their bytes, digest and provenance, and ``maskray import``.

Every job that takes a model (``infer --checkpoint``, ``eval``, ``show``, ``model.weights`` and
``model.backbone_weights`` in training) reads it through here, so the same three kinds of source
work everywhere:

* a maskray checkpoint (``model.pt`` of a training run, or ``maskray import``'s output), at a local
  path or ``s3://`` URI;
* a plain torchvision state dict at a path or URI (``maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth``),
  recognised by its keys (:func:`model.checkpoint.read_model_file`), with what torchvision's builder
  does to a published file recognised by its sha256 (:func:`model.pretrained.builder_options`: the
  FrozenBatchNorm eps 0 of the v1 COCO files);
* a torchvision name (``torchvision:maskrcnn_resnet50_fpn_v2``), resolved through torchvision's
  weights API into torch.hub's cache, hash-checked (:mod:`model.pretrained`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from typing import Any

from model import pretrained

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model file came from: ``uri`` as given, the sha256 of its bytes, and for a
    torchvision name the weights enum member, its ``meta["categories"]`` and (keypoint models)
    ``meta["keypoint_names"]``."""

    uri: str
    sha256: str
    weights: str = ""
    categories: tuple[str, ...] = ()
    keypoint_names: tuple[str, ...] = ()

    @property
    def model_id(self) -> str:
        """``<uri>#sha256:<first 16 hex>``: the ``model`` column of results."""
        return f"{self.uri}#sha256:{self.sha256[:16]}"

    def record(self, source_format: str) -> dict[str, str]:
        """What provenance keeps of it (``source_format``: maskray checkpoint or torchvision state dict)."""
        out = {"uri": self.uri, "sha256": self.sha256, "format": source_format}
        if self.weights:
            out["torchvision_weights"] = self.weights
        return out


def read_model_bytes(uri: str, *, progress: bool = True) -> tuple[bytes, ModelSource]:
    """The bytes of a model file named by a storage URI or a ``torchvision:`` name (downloaded into
    the torch.hub cache when missing and the network allows; hash-checked)."""
    from pipeline import storage

    if pretrained.is_name(uri):
        file = pretrained.resolve(uri)
        path, digest = pretrained.fetch(file, progress=progress)
        with open(path, "rb") as f:
            data = f.read()
        return data, ModelSource(uri, digest, file.weights, file.categories, file.keypoint_names)
    data = storage.read_bytes(uri)
    return data, ModelSource(uri, hashlib.sha256(data).hexdigest())


def _named(data: bytes, uri: str) -> io.BytesIO:
    buffer = io.BytesIO(data)
    buffer.name = uri  # named in load errors
    return buffer


def _categories(source: ModelSource) -> list[dict] | None:
    if not source.categories:
        return None
    return pretrained.categories_from_names(source.categories, source.keypoint_names)


def read_model(uri: str) -> tuple[Any, dict, dict, ModelSource]:
    """``(config, state_dict, extra, source)`` of any model file, no model built (what a driver
    needs: sizes, categories, digest). :func:`source_format` of ``extra`` says which kind it was."""
    from model.checkpoint import read_model_file

    data, source = read_model_bytes(uri)
    config, state, extra = read_model_file(_named(data, uri), map_location="cpu", categories=_categories(source),
                                           options=pretrained.builder_options(source.sha256))
    return config, state, extra, source


def load_model(uri: str, *, map_location: Any = "cpu") -> tuple[Any, Any, dict, ModelSource]:
    """``(model, config, extra, source)``: any model file, built and loaded strictly, in eval mode."""
    from model.checkpoint import load_checkpoint

    data, source = read_model_bytes(uri)
    model, config, extra = load_checkpoint(_named(data, uri), map_location=map_location, categories=_categories(source),
                                           options=pretrained.builder_options(source.sha256))
    return model, config, extra, source


def source_format(extra: dict) -> str:
    """The kind of file a model came from: ``torchvision-state-dict`` or ``maskray-checkpoint/1``."""
    from model.checkpoint import FORMAT

    return str(extra.get("source_format", FORMAT))


def reported_categories(config: Any) -> list[dict]:
    """``{"id", "name"}`` of every category a model reports (torchvision's "N/A" slots left out)."""
    unused = set(config.unused_labels())
    return [{"id": int(c["id"]), "name": str(c["name"])}
            for label, c in enumerate(config.categories, start=1) if label not in unused]


@dataclasses.dataclass
class ImportSummary:
    """What :func:`import_model` wrote."""

    out: str
    source: ModelSource
    source_format: str
    config: Any

    def line(self) -> str:
        c = self.config
        return (f"imported {self.source.uri} ({self.source_format}, sha256 {self.source.sha256[:16]}) -> {self.out}: "
                f"{c.backbone} {c.variant}, {c.num_classes - 1 - len(c.unused_labels())} categories"
                + (f", {c.num_keypoints} keypoints" if c.num_keypoints else "") + ("" if c.masks else ", no masks"))


def import_model(src: str, out: str) -> ImportSummary:
    """Write ``src`` (any model source, see the module docstring) as a self-describing maskray
    checkpoint at ``out`` (local path or ``s3://``): its config, categories, and in ``extra`` the
    source URI, the source file's sha256 and, for a torchvision name, the weights enum member.
    A cluster then reads one file from object storage, with no download on every node."""
    from model.checkpoint import FORMAT, save_checkpoint
    from pipeline import storage

    model, config, extra, source = load_model(src)
    kind = source_format(extra)
    if kind == FORMAT and extra.get("source"):
        provenance = {k: extra[k] for k in ("source", "source_sha256", "torchvision_weights") if k in extra}
    else:
        provenance = {"source": source.uri, "source_sha256": source.sha256}
        if source.weights:
            provenance["torchvision_weights"] = source.weights
    buffer = io.BytesIO()
    save_checkpoint(buffer, model, config, extra=dict(provenance, imported_from=source.uri))
    storage.write_bytes(out, buffer.getvalue())
    return ImportSummary(out, source, kind, config)
