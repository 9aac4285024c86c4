"""Datasets: the maskray-shards/1 format, decoding, COCO conversion and packing, ingest, synthetic data."""
