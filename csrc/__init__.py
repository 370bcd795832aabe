"""C++ sources of fastppo's native CPU kernels, compiled on first use by fastppo.native."""
