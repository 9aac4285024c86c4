"""Mask R-CNN assembled from torchvision's detection parts, pooling with our RoIAlign op.

``build_maskrcnn`` composes a ResNet-FPN backbone, anchor generator, RPN, RoI heads and
mask head/predictor exactly as torchvision's ``maskrcnn_resnet50_fpn`` (``variant="v1"``)
and ``maskrcnn_resnet50_fpn_v2`` (``variant="v2"``) do, so a torchvision state dict of
those models loads with ``strict=True`` and gives the same outputs. The only difference is
the box, mask and keypoint poolers: ``model.ops.MultiScaleRoIAlign``, which runs
``torch.ops.maskray.roi_align``. ``num_keypoints=K`` adds the keypoint branch of the paper's
§5 (``model.keypoint_heads``); with ``masks=False`` the model is torchvision's
``keypointrcnn_resnet50_fpn`` (whose state dicts then load strictly), with both it is the paper's
keypoint & mask model.

Every submodule can be passed in; those left ``None`` are built with torchvision's
defaults. Masks are per-class binary masks, decoupled from classification (the mask of the
predicted class is selected after classification), as in the Mask R-CNN paper; the mask-branch
ablations of the paper's Table 2 (softmax loss, class-agnostic masks, MLP head) are options,
built from ``model.mask_heads``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from model import keypoint_heads, mask_heads, ops
from model.errors import MaskrayError

BACKBONES: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}
VARIANTS = ("v1", "v2")
NORMS = ("bn", "frozen_bn", "gn")

DEFAULT_ANCHOR_SIZES: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)
FEATURE_MAPS = ["0", "1", "2", "3"]
GN_GROUPS = 32


def norm_layer(norm: str | None, frozen_bn_eps: float | None = None) -> Callable[[int], nn.Module] | None:
    """The normalisation constructor for ``norm`` ("bn", "frozen_bn", "gn"; None = no norm);
    ``frozen_bn_eps`` (None: FrozenBatchNorm2d's 1e-5) is the eps of "frozen_bn"."""
    if norm is None:
        return None
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "frozen_bn":
        if frozen_bn_eps is not None:
            return partial(misc_nn_ops.FrozenBatchNorm2d, eps=float(frozen_bn_eps))
        return misc_nn_ops.FrozenBatchNorm2d
    if norm == "gn":
        return partial(nn.GroupNorm, GN_GROUPS)
    raise MaskrayError(f"model norm {norm!r} is not one of {', '.join(NORMS)}")


def build_backbone(
    *,
    backbone: str = "resnet50",
    trainable_layers: int = 5,
    norm: str = "bn",
    fpn_norm: str | None = None,
    fpn_channels: int = 256,
    frozen_bn_eps: float | None = None,
) -> BackboneWithFPN:
    """A randomly initialised ResNet with an FPN on top (levels "0".."3" and "pool", ``fpn_channels`` each).

    ``frozen_bn_eps`` sets the eps of a "frozen_bn" body (None: 1e-5): torchvision's builders put 0
    there for some published COCO weights (``overwrite_eps(model, 0.0)``, which those weights need to
    give their published outputs; :func:`model.pretrained.builder_options`).

    ``norm`` normalises the ResNet body, ``fpn_norm`` the FPN convolutions (None: plain convs,
    as torchvision v1; "bn": as torchvision v2). ``trainable_layers`` (0..5) counts the ResNet
    stages left trainable from the top, as torchvision's ``trainable_backbone_layers``.
    """
    if backbone not in BACKBONES:
        raise MaskrayError(f"model backbone {backbone!r} is not one of {', '.join(BACKBONES)}")
    if not 0 <= trainable_layers <= 5:
        raise MaskrayError(f"model trainable_layers={trainable_layers} is outside 0..5")
    if fpn_channels < 1:
        raise MaskrayError(f"model fpn_channels={fpn_channels} must be >= 1")
    if frozen_bn_eps is not None and (norm != "frozen_bn" or not frozen_bn_eps >= 0):
        raise MaskrayError(f"model frozen_bn_eps={frozen_bn_eps!r} needs norm 'frozen_bn' and a value >= 0")
    body = BACKBONES[backbone](weights=None, norm_layer=norm_layer(norm, frozen_bn_eps))
    extractor = _resnet_fpn_extractor(body, trainable_layers, norm_layer=norm_layer(fpn_norm))
    if fpn_channels != 256:  # torchvision fixes 256: swap in an FPN of the asked width (same layout)
        in_channels = [block[0].in_channels for block in extractor.fpn.inner_blocks]
        extractor.fpn = FeaturePyramidNetwork(
            in_channels, fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer(fpn_norm)
        )
        extractor.out_channels = fpn_channels
    return extractor


def build_maskrcnn(
    *,
    backbone: str = "resnet50",
    num_classes: int = 91,
    variant: str = "v1",
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    trainable_layers: int = 5,
    norm: str = "bn",
    head_norm: str | None = None,
    fpn_channels: int = 256,
    frozen_bn_eps: float | None = None,
    box_head_dim: int = 1024,
    mask_head_channels: Sequence[int] = (256, 256, 256, 256),
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    pooler: str = "roialign",
    # mask branch ablations (Mask R-CNN's Table 2; defaults = the paper's and torchvision's)
    mask_loss: str = "sigmoid",
    class_agnostic_mask: bool = False,
    mask_head_type: str = "fcn",
    # branches: masks (default) and keypoints (0 = none; the paper's §5)
    masks: bool = True,
    num_keypoints: int = 0,
    keypoint_head_channels: Sequence[int] = keypoint_heads.HEAD_CHANNELS,
    # anchors and RPN (torchvision's defaults)
    anchor_sizes: Sequence[Sequence[int]] = DEFAULT_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.7,
    rpn_fg_iou_thresh: float = 0.7,
    rpn_bg_iou_thresh: float = 0.3,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    rpn_score_thresh: float = 0.0,
    # RoI heads (torchvision's defaults)
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    box_fg_iou_thresh: float = 0.5,
    box_bg_iou_thresh: float = 0.5,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    bbox_reg_weights: tuple[float, float, float, float] | None = None,
    # submodules: built as torchvision does when None
    backbone_module: nn.Module | None = None,
    rpn_anchor_generator: AnchorGenerator | None = None,
    rpn_head: nn.Module | None = None,
    box_roi_pool: nn.Module | None = None,
    box_head: nn.Module | None = None,
    box_predictor: nn.Module | None = None,
    mask_roi_pool: nn.Module | None = None,
    mask_head: nn.Module | None = None,
    mask_predictor: nn.Module | None = None,
    keypoint_roi_pool: nn.Module | None = None,
    keypoint_head: nn.Module | None = None,
    keypoint_predictor: nn.Module | None = None,
) -> FasterRCNN:
    """A torchvision ``MaskRCNN`` whose box and mask poolers are ``model.ops.MultiScaleRoIAlign``.

    ``variant="v1"`` is ``maskrcnn_resnet50_fpn`` (TwoMLPHead box head, plain FPN and mask
    head, one-conv RPN head); ``variant="v2"`` is ``maskrcnn_resnet50_fpn_v2`` (FPN, 4conv1fc
    box head and mask head normalised with ``head_norm``, default "bn"; two-conv RPN head).
    ``norm`` normalises the ResNet body; the defaults ("bn", ``trainable_layers=5``) are what
    torchvision uses without pretrained weights, so its state dicts load with ``strict=True``.
    ``head_norm="gn"`` gives the GroupNorm heads of the paper's later variants. ``frozen_bn_eps``
    (None: 1e-5) is the eps of a "frozen_bn" body (:func:`build_backbone`).

    Width (defaults = torchvision's): ``fpn_channels`` FPN/RPN/RoI-feature channels,
    ``box_head_dim`` the box head's hidden size, ``mask_head_channels`` one 3x3 conv per entry
    in the mask head. Narrower heads cut training cost several-fold on CPU-sized problems.

    ``pooler`` picks the box and mask poolers' RoI pooling, the modes of Mask R-CNN's Table 2
    (``model.ops.POOLER_MODES``): "roialign" (default; torchvision's ``aligned=False``, what its
    weights were trained with), "roialign_v2" (``aligned=True``), "roiwarp", "roipool".

    The mask branch ablations of Table 2 (exact definitions in ``model.mask_heads``):
    ``mask_loss`` "sigmoid" (default: per-class binary cross-entropy on the class's own mask,
    torchvision's ``maskrcnn_loss``) or "softmax" (Table 2b: per pixel a softmax over a background
    score pinned at 0 and the K class logits, cross-entropy against the RoI's class at its mask's
    pixels and background elsewhere; inference takes the class's softmax probability);
    ``class_agnostic_mask=True`` predicts one mask for every class (one output channel, used
    whatever the label); ``mask_head_type`` "fcn" (default: ``mask_head_channels`` 3x3 convs, a
    deconv to 28x28) or "mlp" (Table 2e: the flattened 14x14 RoI features through two fully
    connected layers of ``box_head_dim`` (the paper's 1024) and one to ``28*28`` logits per mask;
    ``mask_head_channels`` and ``head_norm`` do not apply to it). They shape the mask head and
    predictor only where those are left ``None``. At the defaults the model is torchvision's
    (its ``RoIHeads``); otherwise its RoI heads are ``model.mask_heads.MaskRoIHeads``.

    Branches: ``masks`` (default True) keeps the mask branch; ``num_keypoints=K`` (default 0: none)
    adds the keypoint branch of ``model.keypoint_heads``: a 14x14 pooler (mode ``pooler``), one 3x3
    conv per entry of ``keypoint_head_channels`` (default eight of 512, torchvision's), a deconv and
    x2 upsampling to ``[R, K, 56, 56]`` heatmaps, trained with torchvision's ``keypointrcnn_loss``
    (a softmax over the 56x56 heatmap per labelled keypoint). ``masks=False, num_keypoints=K`` is
    torchvision's ``keypointrcnn_resnet50_fpn`` (the paper's keypoint-only model); the mask switches
    above then must stay at their defaults. At least one of the two branches is required.

    Input: a list of float CHW images in [0, 1]; output: torchvision's target/prediction dicts.
    Training targets: ``boxes`` float ``[N, 4]`` xyxy, ``labels`` int64 ``[N]``, with masks ``masks``
    uint8 ``[N, H, W]``, with keypoints ``keypoints`` float32 ``[N, K, 3]`` (x, y, v; v = 0 not
    labelled) in EVERY target, ``[0, K, 3]`` for an image without instances
    (``model.keypoint_heads.empty_keypoints``). Predictions add ``masks`` ``[N, 1, H, W]``
    probabilities and/or torchvision's ``keypoints`` ``[N, K, 3]`` (x, y, 1) and
    ``keypoints_scores`` ``[N, K]`` (heatmap logits).
    """
    if variant not in VARIANTS:
        raise MaskrayError(f"model variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if num_classes < 2:
        raise MaskrayError(f"model num_classes={num_classes} must be >= 2 (background + at least one class)")
    if pooler not in ops.POOLER_MODES:
        raise MaskrayError(f"model pooler {pooler!r} is not one of {', '.join(ops.POOLER_MODES)}")
    mask_heads.check_mask_loss(mask_loss)
    if isinstance(mask_head, str):
        raise MaskrayError(f"model mask_head takes a module; the kind of head ({mask_head!r}) is mask_head_type, "
                           f"one of {', '.join(mask_heads.MASK_HEAD_TYPES)}")
    if not isinstance(class_agnostic_mask, bool):
        raise MaskrayError(f"model class_agnostic_mask must be true or false, got {class_agnostic_mask!r}")
    if mask_head_type not in mask_heads.MASK_HEAD_TYPES:
        raise MaskrayError(
            f"model mask_head_type {mask_head_type!r} is not one of {', '.join(mask_heads.MASK_HEAD_TYPES)}"
        )
    if not isinstance(masks, bool):
        raise MaskrayError(f"model masks must be true or false, got {masks!r}")
    keypoint_heads.check_num_keypoints(num_keypoints)
    if not masks and not num_keypoints:
        raise MaskrayError("model masks=false needs num_keypoints >= 1 (a model predicts masks, keypoints or both)")
    if not masks:
        changed = [name for name, value, default in (
            ("mask_loss", mask_loss, "sigmoid"), ("class_agnostic_mask", class_agnostic_mask, False),
            ("mask_head_type", mask_head_type, "fcn"), ("mask_roi_pool", mask_roi_pool, None),
            ("mask_head", mask_head, None), ("mask_predictor", mask_predictor, None)) if value != default]
        if changed:
            raise MaskrayError(f"model {', '.join(changed)} apply to the mask branch, and masks=false has none")
    if not num_keypoints and any(m is not None for m in (keypoint_roi_pool, keypoint_head, keypoint_predictor)):
        raise MaskrayError("model keypoint_roi_pool/keypoint_head/keypoint_predictor need num_keypoints >= 1")
    if variant == "v2" and head_norm is None:
        head_norm = "bn"
    if variant == "v1" and head_norm is not None:
        raise MaskrayError("model head_norm applies to variant 'v2' only (v1 heads have no normalisation)")

    if backbone_module is None:
        backbone_module = build_backbone(
            backbone=backbone, trainable_layers=trainable_layers, norm=norm, fpn_norm=head_norm,
            fpn_channels=fpn_channels, frozen_bn_eps=frozen_bn_eps,
        )
    channels = backbone_module.out_channels

    if rpn_anchor_generator is None:
        sizes = tuple(tuple(s) for s in anchor_sizes)
        rpn_anchor_generator = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
    if rpn_head is None:
        rpn_head = RPNHead(
            channels, rpn_anchor_generator.num_anchors_per_location()[0], conv_depth=2 if variant == "v2" else 1
        )
    if box_roi_pool is None:
        box_roi_pool = ops.MultiScaleRoIAlign(FEATURE_MAPS, 7, 2, mode=pooler)
    if box_head is None:
        resolution = _output_size(box_roi_pool)
        if variant == "v1":
            box_head = TwoMLPHead(channels * resolution**2, box_head_dim)
        else:
            box_head = FastRCNNConvFCHead(
                (channels, resolution, resolution), [channels] * 4, [box_head_dim], norm_layer=norm_layer(head_norm)
            )
    if box_predictor is None:
        box_predictor = FastRCNNPredictor(box_head_dim, num_classes)
    if masks:
        if mask_roi_pool is None:
            mask_roi_pool = ops.MultiScaleRoIAlign(FEATURE_MAPS, 14, 2, mode=pooler)
        mask_head, mask_predictor = _mask_branch(
            mask_head, mask_predictor, mask_head_type=mask_head_type, channels=channels,
            resolution=_output_size(mask_roi_pool), num_masks=1 if class_agnostic_mask else num_classes,
            box_head_dim=box_head_dim, mask_head_channels=mask_head_channels, head_norm=head_norm)

    if num_keypoints:
        if keypoint_roi_pool is None:
            keypoint_roi_pool = ops.MultiScaleRoIAlign(FEATURE_MAPS, keypoint_heads.POOL_SIZE, 2, mode=pooler)
        if (keypoint_head is None or keypoint_predictor is None) and (
                not keypoint_head_channels or any(int(c) < 1 for c in keypoint_head_channels)):
            raise MaskrayError(f"model keypoint_head_channels {list(keypoint_head_channels)!r} must name at least "
                               "one conv layer, each of >= 1 channel")
        if keypoint_head is None:
            keypoint_head = KeypointRCNNHeads(channels, [int(c) for c in keypoint_head_channels])
        if keypoint_predictor is None:
            keypoint_predictor = KeypointRCNNPredictor(int(keypoint_head_channels[-1]), num_keypoints)

    mask_kwargs = dict(mask_head=mask_head, mask_predictor=mask_predictor) if masks else {}
    model = (MaskRCNN if masks else FasterRCNN)(
        backbone_module,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        image_mean=image_mean,
        image_std=image_std,
        rpn_anchor_generator=rpn_anchor_generator,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_nms_thresh=rpn_nms_thresh,
        rpn_fg_iou_thresh=rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=rpn_bg_iou_thresh,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        rpn_positive_fraction=rpn_positive_fraction,
        rpn_score_thresh=rpn_score_thresh,
        box_head=box_head,
        box_predictor=box_predictor,
        box_score_thresh=box_score_thresh,
        box_nms_thresh=box_nms_thresh,
        box_detections_per_img=box_detections_per_img,
        box_fg_iou_thresh=box_fg_iou_thresh,
        box_bg_iou_thresh=box_bg_iou_thresh,
        box_batch_size_per_image=box_batch_size_per_image,
        box_positive_fraction=box_positive_fraction,
        bbox_reg_weights=bbox_reg_weights,
        **mask_kwargs,
    )
    if mask_loss != "sigmoid" or class_agnostic_mask:  # torchvision's RoIHeads at the defaults
        model.roi_heads = mask_heads.MaskRoIHeads(
            box_roi_pool, box_head, box_predictor,
            box_fg_iou_thresh, box_bg_iou_thresh, box_batch_size_per_image, box_positive_fraction, bbox_reg_weights,
            box_score_thresh, box_nms_thresh, box_detections_per_img,
            mask_roi_pool=mask_roi_pool, mask_head=mask_head, mask_predictor=mask_predictor, mask_loss=mask_loss,
        )
    # MaskRCNN's constructor type-checks poolers against torchvision's own class, so ours
    # are installed on the RoI heads after construction (poolers hold no parameters).
    model.roi_heads.box_roi_pool = box_roi_pool
    if masks:
        model.roi_heads.mask_roi_pool = mask_roi_pool
    if num_keypoints:  # as torchvision's KeypointRCNN installs its branch (RoIHeads runs it when all three are set)
        model.roi_heads.keypoint_roi_pool = keypoint_roi_pool
        model.roi_heads.keypoint_head = keypoint_head
        model.roi_heads.keypoint_predictor = keypoint_predictor
    return model


def _mask_branch(
    mask_head: nn.Module | None, mask_predictor: nn.Module | None, *, mask_head_type: str, channels: int,
    resolution: int, num_masks: int, box_head_dim: int, mask_head_channels: Sequence[int], head_norm: str | None,
) -> tuple[nn.Module, nn.Module]:
    """The mask head and predictor, each built where left ``None`` (see :func:`build_maskrcnn`)."""
    if mask_head_type == "mlp":
        if mask_head is None:
            mask_head = mask_heads.MaskMLPHead(channels * resolution**2, [box_head_dim] * 2)
        if mask_predictor is None:
            mask_predictor = mask_heads.MaskMLPPredictor(box_head_dim, num_masks, 2 * resolution)
        return mask_head, mask_predictor
    if mask_head is None:
        if not mask_head_channels:
            raise MaskrayError("model mask_head_channels must name at least one conv layer")
        mask_head = MaskRCNNHeads(channels, list(mask_head_channels), 1, norm_layer=norm_layer(head_norm))
    if mask_predictor is None:
        width = mask_head_channels[-1]
        mask_predictor = MaskRCNNPredictor(width, width, num_masks)
    return mask_head, mask_predictor


def _output_size(pool: nn.Module) -> int:
    size = pool.output_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size)
