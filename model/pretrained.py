"""torchvision's pretrained models by name, and plain torchvision state dicts recognised by their keys.

Names (what ``--checkpoint``, ``model.weights`` and ``model.backbone_weights`` accept)::

    torchvision:maskrcnn_resnet50_fpn_v2              the model's DEFAULT weights
    torchvision:maskrcnn_resnet50_fpn.COCO_V1         a tag of the model's weights enum
    torchvision:ResNet50_Weights.IMAGENET1K_V1        an enum member, as torchvision.models.get_weight names it

are resolved through torchvision's own weights API (``get_model_weights`` / ``get_weight``): the
URL, the file name (whose ``-<hex>.`` part is the sha256 prefix torch.hub checks) and
``meta["categories"]``. Files live in torch.hub's cache (``$TORCH_HOME/hub/checkpoints``), are
downloaded there with torch.hub's progress bar where the network allows, and are hash-checked
every time they are used, not only when downloaded: a damaged or substituted cached file is
refused naming both hashes. Offline and not cached: one line naming the URL and the exact path
where the file should be put.

A plain state dict (the file a ``*_Weights`` URL serves, or ``model.state_dict()`` of a torchvision
detector) is recognised by its keys (:func:`detect_layout`): ``maskrcnn_resnet50_fpn`` (v1, legacy
key names included), ``maskrcnn_resnet50_fpn_v2`` and ``keypointrcnn_resnet50_fpn`` (legacy and v1
files) layouts, with the backbone depth, body norm (BatchNorm or FrozenBatchNorm), widths, number of
classes and of keypoints read from it. A keypoint model's categories carry COCO's ``keypoints``
(names, from the weights' ``meta["keypoint_names"]``) and, for COCO's 17 person keypoints, COCO's
``skeleton``. Knows nothing of Ray or object storage: callers hand it bytes or local paths.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from model.errors import MaskrayError

PREFIX = "torchvision:"
SUPPORTED_DETECTORS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn")
UNUSED = "N/A"  # torchvision's name for the COCO label slots that have no category (12, 26, 29, ...)
# COCO person_keypoints' "skeleton" (1-based pairs of its 17 keypoints, as in person_keypoints_*.json)
COCO_PERSON_SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
                        (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))


def is_name(uri: str) -> bool:
    """Whether ``uri`` names a torchvision pretrained model (``torchvision:...``)."""
    return isinstance(uri, str) and uri.startswith(PREFIX)


@dataclass(frozen=True)
class PretrainedFile:
    """Where one torchvision weights file comes from and where it is cached.

    ``hash_prefix``: the hex digits torch.hub reads from the file name (``-73cbd019.pth``);
    the file's sha256 must start with them. ``categories``: ``meta["categories"]`` (label i's
    name at index i, "__background__" at 0), empty for classification weights' 1,000 classes.
    ``keypoint_names``: ``meta["keypoint_names"]`` of a keypoint model, else empty.
    """

    name: str  # as the user wrote it
    weights: str  # the enum member, e.g. "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
    url: str
    path: str  # in torch.hub's cache
    hash_prefix: str
    categories: tuple[str, ...] = ()
    keypoint_names: tuple[str, ...] = ()


def cache_dir() -> str:
    """torch.hub's checkpoint cache: ``$TORCH_HOME/hub/checkpoints`` (torch.hub.get_dir() rules)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def resolve(name: str) -> PretrainedFile:
    """The :class:`PretrainedFile` of a ``torchvision:`` name (see the module docstring); an unknown
    name raises :class:`MaskrayError` naming it and the models that do exist."""
    from torchvision.models import get_model_weights, get_weight, list_models

    if not is_name(name):
        raise MaskrayError(f"{name!r} is not a torchvision model name (expected {PREFIX}<model>)")
    spec = name[len(PREFIX):].strip()
    model_name, _, tag = spec.partition(".")
    weights: Any = None
    try:
        if "_Weights" in model_name:
            weights = get_weight(spec)
        else:
            enum = get_model_weights(model_name)
            weights = enum.DEFAULT if not tag else enum[tag]
    except (KeyError, ValueError, AttributeError) as exc:
        known = list_models()
        near = [m for m in known if model_name.lower() in m or m in model_name.lower()][:6]
        hint = f" (did you mean {', '.join(near)}?)" if near else f" ({len(known)} models: e.g. {', '.join(SUPPORTED_DETECTORS)})"
        raise MaskrayError(f"{name}: torchvision has no such weights: {exc}".splitlines()[0] + hint) from None
    filename = os.path.basename(weights.url.split("?", 1)[0])
    found = torch.hub.HASH_REGEX.search(filename)
    if found is None:
        raise MaskrayError(f"{name}: torchvision's file name {filename} carries no hash prefix to check")
    categories = tuple(weights.meta.get("categories") or ())
    return PretrainedFile(name=name, weights=str(weights), url=weights.url, path=os.path.join(cache_dir(), filename),
                          hash_prefix=found.group(1), categories=categories if len(categories) < 1000 else (),
                          keypoint_names=tuple(weights.meta.get("keypoint_names") or ()))


def sha256_of(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_cached(file: PretrainedFile) -> str:
    """The cached file's full sha256 once its prefix matches; :class:`MaskrayError` naming both otherwise."""
    digest = sha256_of(file.path)
    if not digest.startswith(file.hash_prefix):
        raise MaskrayError(f"{file.name}: cached file {file.path} has sha256 {digest[:16]}..., torchvision's "
                           f"file name says it must start with {file.hash_prefix}; the file is damaged or not "
                           "the published one: delete it to download it again")
    return digest


def fetch(file: PretrainedFile, *, progress: bool = True) -> tuple[str, str]:
    """``(path, sha256)`` of ``file`` in the cache, downloaded first when missing (torch.hub's
    ``download_url_to_file``: a temporary file, the hash prefix checked, then moved into place,
    so an interrupted download never leaves a file that looks cached)."""
    if not os.path.exists(file.path):
        os.makedirs(os.path.dirname(file.path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(file.url, file.path, hash_prefix=file.hash_prefix, progress=progress)
        except RuntimeError as exc:  # torch.hub: 'invalid hash value (expected ..., got ...)'
            raise MaskrayError(f"{file.name}: download from {file.url} failed its hash check: {exc}") from None
        except OSError as exc:  # URLError, timeouts, refused connections, DNS failures
            reason = getattr(exc, "reason", None) or exc
            raise MaskrayError(f"{file.name}: not cached and cannot be downloaded from {file.url} ({reason}); "
                               f"offline, fetch that URL elsewhere and put the file at {file.path}") from None
    return file.path, check_cached(file)


# torchvision's builders call overwrite_eps(model, 0.0) when they load these weights: every
# FrozenBatchNorm2d of the model then has eps 0, and the weights give their published outputs only so
ZERO_EPS_WEIGHTS = ("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
                    "KeypointRCNN_ResNet50_FPN_Weights.COCO_V1")


def builder_options(sha256: str) -> dict[str, Any]:
    """``build_maskrcnn`` options that torchvision's builder applies to the published file whose
    content has this sha256 (recognised by the hash prefix in its URL's file name, however the file
    was named or reached): ``{"frozen_bn_eps": 0.0}`` for :data:`ZERO_EPS_WEIGHTS`, else ``{}``."""
    from torchvision.models import get_weight

    for name in ZERO_EPS_WEIGHTS:
        found = torch.hub.HASH_REGEX.search(os.path.basename(get_weight(name).url))
        if found and sha256.startswith(found.group(1)):
            return {"frozen_bn_eps": 0.0}
    return {}


# --------------------------------------------------------------------------- plain state dicts


def coco_categories() -> list[dict]:
    """torchvision's COCO detection categories as maskray categories for labels 1..90: label i is
    COCO category id i; torchvision's "N/A" slots are kept (so labels stay aligned) and marked
    ``unused`` (never reported)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    names = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return categories_from_names(names)


def coco_person_categories() -> list[dict]:
    """torchvision's Keypoint R-CNN categories (label 1 "person", COCO id 1) with COCO's 17 keypoint
    names and skeleton: what a plain ``keypointrcnn_resnet50_fpn`` state dict is taken to predict."""
    from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights

    meta = KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.meta
    return categories_from_names(meta["categories"], meta["keypoint_names"])


def categories_from_names(names: tuple[str, ...] | list[str],
                          keypoint_names: tuple[str, ...] | list[str] = ()) -> list[dict]:
    """``meta["categories"]`` (index = label, 0 = background) -> categories for labels 1..K; with
    ``keypoint_names`` (``meta["keypoint_names"]``) every used category gets them as COCO's
    ``keypoints``, and COCO's person ``skeleton`` where they are COCO's 17 person keypoints."""
    from torchvision.models._meta import _COCO_PERSON_KEYPOINT_NAMES

    out = []
    for label, name in enumerate(names):
        if label == 0:
            continue
        category: dict = {"id": label, "name": str(name)}
        if name == UNUSED:
            category["unused"] = True
        elif keypoint_names:
            category["keypoints"] = [str(k) for k in keypoint_names]
            if list(keypoint_names) == list(_COCO_PERSON_KEYPOINT_NAMES):
                category["skeleton"] = [list(pair) for pair in COCO_PERSON_SKELETON]
        out.append(category)
    return out


def _count_blocks(state: dict, layer: str) -> int:
    blocks = {k.split(".")[3] for k in state if k.startswith(f"backbone.body.{layer}.")}
    return len(blocks)


def detect_layout(state: dict[str, torch.Tensor], name: str = "<state dict>") -> dict[str, Any]:
    """:class:`~model.checkpoint.ModelConfig` keyword arguments for a torchvision detector state dict.

    Recognises ``maskrcnn_resnet50_fpn`` (box head ``fc6``/``fc7``; ``rpn.head.conv.weight`` and
    ``mask_head.mask_fcn1`` legacy names or the current ones), ``maskrcnn_resnet50_fpn_v2``
    (conv box head ``box_head.0.0``) and ``keypointrcnn_resnet50_fpn`` (``keypoint_predictor``:
    ``masks=False``, ``num_keypoints`` from its deconv, keypoint head widths from its convs; a mask
    head beside it gives the keypoint & mask model), on a ResNet-18/34/50/101 body. The body's norm
    is "frozen_bn" when its BatchNorm layers keep no ``num_batches_tracked`` (the published COCO
    files), "bn" otherwise. Anything else (e.g. a Faster R-CNN without either branch) raises
    :class:`MaskrayError` naming the first key that does not fit.
    """
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MaskrayError(f"{name} is not a state dict of tensors")
    for key in ("backbone.body.conv1.weight", "rpn.head.cls_logits.weight", "roi_heads.box_predictor.cls_score.weight"):
        if key not in state:
            raise MaskrayError(f"{name} is neither a maskray checkpoint nor a torchvision detector state dict "
                               f"(no {key})")
    masks = "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
    deconv = state.get("roi_heads.keypoint_predictor.kps_score_lowres.weight")
    if not masks and deconv is None:
        raise MaskrayError(f"{name} is a Faster R-CNN state dict (neither a mask nor a keypoint head); maskray runs "
                           "Mask R-CNN and Keypoint R-CNN")
    if "roi_heads.box_head.fc6.weight" in state:
        variant = "v1"
    elif "roi_heads.box_head.0.0.weight" in state:
        variant = "v2"
    else:
        raise MaskrayError(f"{name}: box head is neither torchvision's TwoMLPHead (fc6) nor its conv head (box_head.0.0)")
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state
    depth = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}.get(
        (bottleneck, _count_blocks(state, "layer3")))
    if depth is None:
        raise MaskrayError(f"{name}: its ResNet body ({_count_blocks(state, 'layer3')} blocks in layer3) is not "
                           "resnet18/34/50/101")
    if "backbone.body.bn1.running_mean" not in state:
        raise MaskrayError(f"{name}: its ResNet body has no BatchNorm statistics (backbone.body.bn1.running_mean)")
    norm = "bn" if "backbone.body.bn1.num_batches_tracked" in state else "frozen_bn"
    cls = state["roi_heads.box_predictor.cls_score.weight"]
    options: dict[str, Any] = {}
    fpn_channels = int(state["rpn.head.cls_logits.weight"].shape[1])
    if fpn_channels != 256:
        options["fpn_channels"] = fpn_channels
    if int(cls.shape[1]) != 1024:
        options["box_head_dim"] = int(cls.shape[1])
    num_keypoints = 0
    if deconv is not None:
        if deconv.dim() != 4:
            raise MaskrayError(f"{name}: roi_heads.keypoint_predictor.kps_score_lowres.weight has shape "
                               f"{tuple(deconv.shape)}, not a transposed conv's [in, K, 4, 4]")
        num_keypoints = int(deconv.shape[1])
        convs = sorted(int(k.split(".")[2]) for k in state
                       if k.startswith("roi_heads.keypoint_head.") and k.endswith(".weight"))
        widths = [int(state[f"roi_heads.keypoint_head.{i}.weight"].shape[0]) for i in convs]
        if not widths or widths[-1] != int(deconv.shape[0]):
            raise MaskrayError(f"{name}: its keypoint head ({len(widths)} convs) does not feed its keypoint "
                               f"predictor ({int(deconv.shape[0])} input channels)")
        if widths != [512] * 8:
            options["keypoint_head_channels"] = widths
    return {"backbone": depth, "variant": variant, "norm": norm, "num_classes": int(cls.shape[0]),
            "trainable_layers": 3 if norm == "frozen_bn" else 5, "masks": masks, "num_keypoints": num_keypoints,
            "options": options}
