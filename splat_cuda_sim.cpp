// splat_cuda.cu compiled as C++ for the CPU: its kernels run thread by thread under cuda_sim.h (the "cuda-sim"
// backend of splat.py, slow, for tests and for reading; docs/walkthrough.md 6).
#define SPLAT_CUDA_SIM
#include "splat_cuda.cu"
