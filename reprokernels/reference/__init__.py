"""Pure-PyTorch references in float32/float64 math: the specification and the test oracle of every op."""
