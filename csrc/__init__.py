"""C++ sources of fastppo's native CPU kernels, compiled on first use by fastppo.kernels._native."""
