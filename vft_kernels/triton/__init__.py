"""Triton kernels (backend "triton"), one file per op, plus aot.py (ahead-of-time compile report)."""
