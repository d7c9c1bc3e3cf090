"""One file per op: torch.library registration, autograd.Function and the public function."""
