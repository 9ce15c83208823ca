"""Op layer: public functions, argument checks, torch.library custom ops and autograd, one file per op."""
