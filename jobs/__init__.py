"""Thin entry points that Ray jobs run (``python -m jobs.train`` …); the CLI calls them.

Every job module keeps its top-level imports to the standard library so that
``maskray --help`` stays fast; torch, Ray and ``pipeline`` are imported inside ``run``.
Each module exposes ``add_arguments(parser)``, ``run(args) -> int`` and ``main(argv)``.
"""
