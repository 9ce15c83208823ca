"""Host-side wrappers of the C++/CUDA kernels in csrc/ (backends "cpu" and "cuda"), one file per op."""
