"""Everything the jobs do, as library calls, between ``model`` (pure torch) and ``jobs`` (entry points).

Packages by job: :mod:`pipeline.data` (format, decode, conversion, ingest, synth),
:mod:`pipeline.train`, :mod:`pipeline.infer`, :mod:`pipeline.distill`, :mod:`pipeline.show`;
shared at the top: :mod:`pipeline.storage` (URIs), :mod:`pipeline.raysetup` (starting Ray),
:mod:`pipeline.weights` (model sources), :mod:`pipeline.instances`, :mod:`pipeline.evaluate`.
Submodules are imported explicitly; this package imports nothing heavy.
"""
