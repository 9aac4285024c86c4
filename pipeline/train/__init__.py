"""Training as a library call: ``fit(config) -> TrainResult``.

* :mod:`pipeline.train.config` — :class:`TrainConfig` (embeds the model's own ``ModelConfig``),
  loaded from YAML with ``--set`` overrides;
* :mod:`pipeline.train.engine` — :func:`fit`, the Ray Train driver (planning, the run's
  remembered config, the data stream, the trainer);
* :mod:`pipeline.train.loop` — what each worker runs: a step function plus hooks.

Names are exported lazily (PEP 562): ``import pipeline.train`` does not import torch or Ray.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "fit": "pipeline.train.engine",
    "TrainResult": "pipeline.train.engine",
    "TrainConfig": "pipeline.train.config",
    "ConfigError": "pipeline.train.config",
    "load_config": "pipeline.train.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.train' has no attribute {name!r}")
