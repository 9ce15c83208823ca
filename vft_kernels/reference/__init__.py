"""Pure-PyTorch ground truth of every op (SPEC.md), one file per op: short and obviously right."""
