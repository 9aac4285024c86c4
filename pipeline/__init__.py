"""The data and training machinery between ``model`` (pure torch) and ``jobs`` (entry points).

Storage URIs (:mod:`pipeline.storage`), the maskray-shards/1 dataset format
(:mod:`pipeline.format`), converters (:mod:`pipeline.convert`, :mod:`pipeline.synth`), the Ray
Data reader and decoding (:mod:`pipeline.dataset`), training, inference, evaluation and
self-training. Submodules are imported explicitly; this package imports nothing heavy.
"""
