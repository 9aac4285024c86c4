"""Data distillation: TTA pseudo-labels from a teacher, per-class thresholds, rounds of student training."""
