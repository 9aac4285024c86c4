"""Batch segmentation: predictor (model on one device), paste (per-instance RLE), stages (Ray Data CPU/model stages), driver (plan, provenance, write)."""
