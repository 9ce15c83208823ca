"""Pure-PyTorch ground truth of every op (docs/spec.md), one file per op: short and obviously right."""
