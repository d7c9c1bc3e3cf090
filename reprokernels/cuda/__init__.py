"""Python launchers of the CUDA kernels in reprokernels._C: tensors -> raw pointers, strides, stream."""
