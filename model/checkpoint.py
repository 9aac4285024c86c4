"""Self-describing checkpoints: model state plus the small JSON-able config that rebuilds it.

A checkpoint is ``torch.save`` of a dict holding only tensors and plain data::

    {"format": "maskray-checkpoint/1", "config": ModelConfig.to_dict(),
     "model": state_dict, "extra": {...}}

so it loads with ``torch.load(weights_only=True)``: loading never unpickles arbitrary
objects. Label convention: model label ``i`` (1..K) is ``config.categories[i - 1]``,
label 0 is background.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from torch import nn

from model.errors import MaskrayError

FORMAT = "maskray-checkpoint/1"
_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
_VARIANTS = ("v1", "v2")
_NORMS = ("bn", "frozen_bn", "gn")
# = model.ops.POOLER_MODES, model.mask_heads.MASK_LOSSES / MASK_HEAD_TYPES (kept here so that reading a
# config imports neither the op library nor torchvision's detection models; a unit test checks them)
_POOLERS = ("roialign", "roialign_v2", "roiwarp", "roipool")
_MASK_LOSSES = ("sigmoid", "softmax")
_MASK_HEADS = ("fcn", "mlp")
# build_maskrcnn keywords that older checkpoints kept in ``options`` and that are fields now
# (option name -> field name); ModelConfig.from_dict moves them
LEGACY_OPTIONS = {"pooler": "pooler", "mask_loss": "mask_loss", "class_agnostic_mask": "class_agnostic_mask",
                  "mask_head_type": "mask_head"}


class ModelConfigError(MaskrayError):
    """An invalid :class:`ModelConfig` field: ``key`` names it, ``reason`` says what is wrong."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"model config {key}: {reason}")
        self.key, self.reason = key, reason


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model for a checkpoint (validated on construction).

    ``categories`` are COCO ``{"id", "name"}`` dicts for labels 1..K (so ``num_classes`` is
    ``len(categories) + 1``); an empty list means "unnamed": label ``i`` is category id ``i``
    (the convention of torchvision's COCO models, whose 91 labels are COCO ids). A category may
    keep COCO's ``keypoints`` (names, as many as ``num_keypoints``) and ``skeleton`` (1-based pairs).

    Branches: ``masks`` (the mask branch, default on) and ``num_keypoints`` (K > 0 adds the keypoint
    branch, ``model.keypoint_heads``); at least one. The switches of Mask R-CNN's Table 2:
    ``pooler`` (roialign | roialign_v2 | roiwarp | roipool, every RoI pooler of the model),
    ``mask_loss`` (sigmoid | softmax), ``class_agnostic_mask``, ``mask_head`` (fcn | mlp; the
    ``mask_head_type`` of ``build_maskrcnn``); the mask ones keep their defaults without masks.
    ``options`` holds any further keyword arguments of ``build_maskrcnn`` (JSON-able values).
    Older checkpoints kept the four switches in ``options``: :meth:`from_dict` moves them.
    """

    backbone: str = "resnet50"
    num_classes: int = 91
    variant: str = "v1"
    min_size: int = 800
    max_size: int = 1333
    categories: list[dict] = field(default_factory=list)
    norm: str = "bn"
    trainable_layers: int = 5
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100
    masks: bool = True
    num_keypoints: int = 0
    pooler: str = "roialign"
    mask_loss: str = "sigmoid"
    class_agnostic_mask: bool = False
    mask_head: str = "fcn"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def require(ok: bool, key: str, reason: str) -> None:
            if not ok:
                raise ModelConfigError(key, reason)

        require(self.backbone in _BACKBONES, "backbone", f"{self.backbone!r} is not one of {', '.join(_BACKBONES)}")
        require(self.variant in _VARIANTS, "variant", f"{self.variant!r} is not one of {', '.join(_VARIANTS)}")
        require(self.norm in _NORMS, "norm", f"{self.norm!r} is not one of {', '.join(_NORMS)}")
        require(isinstance(self.num_classes, int) and not isinstance(self.num_classes, bool)
                and self.num_classes >= 2, "num_classes", f"{self.num_classes!r} must be an int >= 2")
        require(0 < self.min_size <= self.max_size, "min_size",
                f"need 0 < min_size <= max_size, got {self.min_size} / {self.max_size}")
        require(0 <= self.trainable_layers <= 5, "trainable_layers", f"{self.trainable_layers} is outside 0..5")
        require(0 <= self.box_score_thresh < 1, "box_score_thresh", f"{self.box_score_thresh} is outside [0, 1)")
        require(self.box_detections_per_img > 0, "box_detections_per_img",
                f"must be > 0, got {self.box_detections_per_img}")
        require(isinstance(self.masks, bool), "masks", f"{self.masks!r} must be true or false")
        require(isinstance(self.num_keypoints, int) and not isinstance(self.num_keypoints, bool)
                and self.num_keypoints >= 0, "num_keypoints", f"{self.num_keypoints!r} must be an int >= 0 (0 = none)")
        require(self.masks or self.num_keypoints > 0, "masks",
                "false needs num_keypoints >= 1 (a model predicts masks, keypoints or both)")
        require(self.pooler in _POOLERS, "pooler", f"{self.pooler!r} is not one of {', '.join(_POOLERS)}")
        require(self.mask_loss in _MASK_LOSSES, "mask_loss",
                f"{self.mask_loss!r} is not one of {', '.join(_MASK_LOSSES)}")
        require(isinstance(self.class_agnostic_mask, bool), "class_agnostic_mask",
                f"{self.class_agnostic_mask!r} must be true or false")
        require(self.mask_head in _MASK_HEADS, "mask_head",
                f"{self.mask_head!r} is not one of {', '.join(_MASK_HEADS)}")
        if not self.masks:
            changed = [k for k, default in (("mask_loss", "sigmoid"), ("class_agnostic_mask", False),
                                            ("mask_head", "fcn")) if getattr(self, k) != default]
            require(not changed, changed[0] if changed else "masks",
                    "applies to the mask branch, and masks=false has none")
        self.categories = [dict(c) for c in self.categories]
        for i, c in enumerate(self.categories):
            require("id" in c and "name" in c, f"categories[{i}]", f"{c!r} needs 'id' and 'name'")
            names = c.get("keypoints")
            require(names is None or not self.num_keypoints or (isinstance(names, list) and
                                                                len(names) == self.num_keypoints),
                    f"categories[{i}].keypoints", f"names {len(names) if isinstance(names, list) else names!r} "
                    f"keypoints but num_keypoints={self.num_keypoints}")
        require(not self.categories or len(self.categories) == self.num_classes - 1, "num_classes",
                f"{len(self.categories)} categories but num_classes={self.num_classes}; expected "
                "num_classes = len(categories) + 1 (label 0 is background)")
        for key in self.options:
            require(isinstance(key, str), "options", f"option names must be strings, got {key!r}")
        require("mask_head_type" not in self.options, "options",
                "mask_head_type is the field mask_head (fcn | mlp) of the model config")
        reserved = {f.name for f in dataclasses.fields(ModelConfig)} | {"backbone_module"}
        clash = sorted(set(self.options) & reserved)
        require(not clash, "options", f"repeat top-level fields: {', '.join(clash)}")

    def model_dict(self) -> dict[str, Any]:
        """The :class:`ModelConfig` fields only (a subclass's own fields left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}

    @classmethod
    def for_categories(cls, categories: list[dict], **kwargs: Any) -> ModelConfig:
        """A config whose ``num_classes`` follows from ``categories``."""
        return cls(categories=list(categories), num_classes=len(categories) + 1, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.model_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise MaskrayError(f"model config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MaskrayError(f"model config has unknown fields: {', '.join(unknown)}")
        return cls(**migrate_options(data))

    def category_ids(self) -> list[int]:
        """Category id of each label 1..K (``list[label - 1]``)."""
        if self.categories:
            return [int(c["id"]) for c in self.categories]
        return list(range(1, self.num_classes))

    def unused_labels(self) -> list[int]:
        """Labels the model has but never reports: categories marked ``"unused": true`` (the "N/A"
        slots of torchvision's 91 COCO labels, kept so that label i stays COCO id i)."""
        return [i + 1 for i, c in enumerate(self.categories) if c.get("unused")]


def migrate_options(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stored config dict whose ``options`` no longer hold the Table 2 switches that are
    fields now (:data:`LEGACY_OPTIONS`: ``options: {pooler: roiwarp}`` -> ``pooler: roiwarp``,
    ``mask_head_type`` -> ``mask_head``). Both places naming different values is an error."""
    options = data.get("options")
    if not isinstance(options, dict) or not set(options) & set(LEGACY_OPTIONS):
        return data
    data, options = dict(data), dict(options)
    for old, new in LEGACY_OPTIONS.items():
        if old in options:
            value = options.pop(old)
            if new in data and data[new] != value:
                raise ModelConfigError(new, f"{data[new]!r} but options.{old} says {value!r}")
            data[new] = value
    data["options"] = options
    return data


def build_from_config(config: ModelConfig) -> nn.Module:
    """A freshly initialised model for ``config``."""
    from model.maskrcnn import build_maskrcnn

    return build_maskrcnn(
        backbone=config.backbone,
        num_classes=config.num_classes,
        variant=config.variant,
        min_size=config.min_size,
        max_size=config.max_size,
        norm=config.norm,
        trainable_layers=config.trainable_layers,
        box_score_thresh=config.box_score_thresh,
        box_detections_per_img=config.box_detections_per_img,
        masks=config.masks,
        num_keypoints=config.num_keypoints,
        pooler=config.pooler,
        mask_loss=config.mask_loss,
        class_agnostic_mask=config.class_agnostic_mask,
        mask_head_type=config.mask_head,
        **config.options,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _check_plain(value: Any, where: str) -> None:
    """Raise unless ``value`` is made of tensors and JSON-like data (what weights_only loads)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.Size)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise MaskrayError(f"checkpoint {where} has a key of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise MaskrayError(
        f"checkpoint {where} is a {type(value).__name__}; only tensors, numbers, strings, lists and dicts "
        "can be stored (checkpoints load with weights_only=True)"
    )


def save_checkpoint(
    f: str | os.PathLike | BinaryIO,
    model: nn.Module,
    config: ModelConfig,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s state, ``config`` and ``extra`` (plain data / tensors) to a path or binary file."""
    if not isinstance(config, ModelConfig):
        raise MaskrayError(f"save_checkpoint needs a ModelConfig, got {type(config).__name__}")
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    config_dict = config.to_dict()
    _check_plain(config_dict, "config")
    state = {k: v.detach().contiguous() for k, v in unwrap(model).state_dict().items()}
    torch.save({"format": FORMAT, "config": config_dict, "model": state, "extra": extra}, f)


def _name(f: Any) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return str(getattr(f, "name", "<stream>"))


def _torch_load(f: str | os.PathLike | BinaryIO | bytes, name: str, map_location: Any = "cpu") -> Any:
    """``torch.load(f, weights_only=True)`` with one-line errors naming the file ``name``."""
    if isinstance(f, (bytes, bytearray, memoryview)):
        f = io.BytesIO(bytes(f))
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise MaskrayError(f"checkpoint {name} does not exist") from exc
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MaskrayError(
            f"checkpoint {name} holds objects other than tensors and plain data and was refused "
            f"(loaded with weights_only=True): {first}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MaskrayError(f"checkpoint {name} is not a readable torch file: {first}") from exc


def read_checkpoint(
    f: str | os.PathLike | BinaryIO | bytes, *, map_location: Any = "cpu"
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """``(config, state_dict, extra)`` of a maskray checkpoint, checked and validated, no model built.

    Objects other than tensors and plain data are refused (``weights_only=True``), as are
    files that are not maskray checkpoints, with a one-line :class:`MaskrayError`.
    """
    name = _name(f)
    data = _torch_load(f, name, map_location)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise MaskrayError(f"checkpoint {name} is not a {FORMAT} file (found {found!r})")
    return _parse_checkpoint(data, name)


def _parse_checkpoint(data: dict, name: str) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    for key in ("config", "model"):
        if key not in data:
            raise MaskrayError(f"checkpoint {name} lacks its {key!r} entry")
    return ModelConfig.from_dict(data["config"]), data["model"], dict(data.get("extra") or {})


TORCHVISION_FORMAT = "torchvision-state-dict"  # extra["source_format"] of a plain state dict read as a model


def read_model_file(
    f: str | os.PathLike | BinaryIO | bytes, *, map_location: Any = "cpu", categories: list[dict] | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """``(config, state_dict, extra)`` of a maskray checkpoint or of a plain torchvision Mask R-CNN
    state dict, no model built.

    A plain state dict's config comes from its keys (:func:`model.pretrained.detect_layout`): the
    torchvision builder it fits, with torchvision's default sizes and thresholds; its categories are
    ``categories`` when given (e.g. a weights enum's ``meta["categories"]``), else torchvision's COCO
    categories for a 91-class model, COCO's person with its 17 keypoints for a 2-class, 17-keypoint
    model (``keypointrcnn_resnet50_fpn``), else unnamed; ``options`` (e.g.
    :func:`model.pretrained.builder_options` of the file's sha256) join its layout's options. A
    plain state dict's ``extra`` is
    ``{"source_format": TORCHVISION_FORMAT}``; a checkpoint's is its own.
    """
    from model import pretrained

    name = _name(f)
    data = _torch_load(f, name, map_location)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return _parse_checkpoint(data, name)
    if isinstance(data, dict) and "format" in data and not isinstance(data.get("format"), torch.Tensor):
        raise MaskrayError(f"checkpoint {name} is not a {FORMAT} file (found {data['format']!r})")
    layout = pretrained.detect_layout(data, f"checkpoint {name}")
    if categories is None:
        if layout["num_classes"] == 91:
            categories = pretrained.coco_categories()
        elif layout["num_classes"] == 2 and layout["num_keypoints"] == 17:
            categories = pretrained.coco_person_categories()
        else:
            categories = []
    layout["options"] = dict(layout["options"], **(options or {}))
    config = ModelConfig(categories=categories, **layout)
    return config, data, {"source_format": TORCHVISION_FORMAT}


def load_checkpoint(
    f: str | os.PathLike | BinaryIO | bytes, *, map_location: Any = "cpu", categories: list[dict] | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Load ``(model, config, extra)`` from a maskray checkpoint or a plain torchvision state dict
    (:func:`read_model_file`); the model is rebuilt from the config, loaded strictly, in eval mode."""
    name = _name(f)
    config, state, extra = read_model_file(f, map_location=map_location, categories=categories, options=options)
    model = build_from_config(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        branches = ("masks" if config.masks else "") + (" and " if config.masks and config.num_keypoints else "") + (
            f"{config.num_keypoints} keypoints" if config.num_keypoints else "")
        raise MaskrayError(f"checkpoint {name} weights do not fit its config ({config.backbone}, "
                           f"{config.variant}, {config.num_classes} classes, {branches}): {first}") from exc
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    model.eval()
    return model, config, extra


def load_weights(model: nn.Module, f: str | os.PathLike | BinaryIO | bytes) -> tuple[int, list[str]]:
    """Initialise ``model`` in place from a maskray checkpoint or a plain state dict file
    (e.g. torchvision's ``maskrcnn_resnet50_fpn`` weights) — fine-tuning, not resuming.

    Every tensor whose name and shape match is copied; the rest (e.g. a predictor for another
    number of classes) keep their initialisation. Returns ``(copied, skipped_names)``; a file
    that fits no tensor at all raises :class:`MaskrayError` (it is the wrong file).
    Loaded with ``weights_only=True``.
    """
    name = _name(f)
    data = _torch_load(f, name)
    state = data.get("model") if isinstance(data, dict) and data.get("format") == FORMAT else data
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MaskrayError(f"weights {name} are neither a maskray checkpoint nor a state dict of tensors")
    own = unwrap(model).state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise MaskrayError(f"weights {name}: none of their {len(state)} tensors fits this model "
                           f"(names or shapes differ everywhere)")
    unwrap(model).load_state_dict(fitting, strict=False)
    return len(fitting), sorted(set(own) - set(fitting))


BODY_PREFIX = "backbone.body."  # where the ResNet of build_backbone sits in a Mask R-CNN


def load_backbone_weights(model: nn.Module, f: str | os.PathLike | BinaryIO | bytes) -> int:
    """Initialise the ResNet body of ``model`` from a torchvision ImageNet classification state dict.

    The file has the key layout of torchvision's ``resnet50-0676ba61.pth`` (``conv1.weight``,
    ``bn1.*``, ``layer1.0.conv1.weight`` ... ``fc.*``): every key but the classifier (``fc.*``)
    lands at ``backbone.body.<key>``, as ``maskrcnn_resnet50_fpn(weights_backbone=...)`` does.
    Strict over the body: a body tensor the file lacks, a key with no place in the body, or a
    shape that differs (e.g. resnet18 weights for a resnet50 body) raises :class:`MaskrayError`
    naming it. ``num_batches_tracked`` entries are dropped where the body uses
    ``FrozenBatchNorm2d`` (which has none). Requires-grad flags (``trainable_layers``) are left
    as the builder set them. Returns the number of tensors copied. Loaded with ``weights_only=True``.
    """
    name = _name(f)
    state = _torch_load(f, name)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        raise MaskrayError(f"backbone weights {name} are a whole maskray checkpoint; use model.weights for it")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MaskrayError(f"backbone weights {name} are not a state dict of tensors")
    body = {k[len(BODY_PREFIX):]: v for k, v in unwrap(model).state_dict().items() if k.startswith(BODY_PREFIX)}
    if not body:
        raise MaskrayError(f"backbone weights {name}: the model has no {BODY_PREFIX.rstrip('.')} (not a ResNet-FPN)")
    fitting: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue  # the ImageNet classifier has no place in a detector
        if key not in body:
            if key.endswith("num_batches_tracked"):
                continue  # FrozenBatchNorm2d keeps no counter
            raise MaskrayError(f"backbone weights {name}: {key} has no place in the model's ResNet body "
                               "(expected a torchvision resnet18/34/50/101 classification state dict)")
        if tuple(value.shape) != tuple(body[key].shape):
            raise MaskrayError(f"backbone weights {name}: {key} has shape {tuple(value.shape)} but the model's "
                               f"{BODY_PREFIX}{key} is {tuple(body[key].shape)} (weights of another ResNet depth?)")
        fitting[BODY_PREFIX + key] = value
    missing = sorted(k for k in body if BODY_PREFIX + k not in fitting and not k.endswith("num_batches_tracked"))
    if missing:
        raise MaskrayError(f"backbone weights {name} lack {len(missing)} tensors of the ResNet body, "
                           f"e.g. {', '.join(missing[:3])}")
    unwrap(model).load_state_dict(fitting, strict=False)
    return len(fitting)
