"""maskray's model: Mask R-CNN on our RoIAlign op, and its checkpoints.

Names are exported lazily (PEP 562) so ``import model`` stays cheap: the op library is
loaded only when a model is built.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_maskrcnn": "model.maskrcnn",
    "ModelConfig": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "load_checkpoint": "model.checkpoint",
    "load_weights": "model.checkpoint",
    "load_backbone_weights": "model.checkpoint",
    "build_from_config": "model.checkpoint",
    "MaskrayError": "model.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
