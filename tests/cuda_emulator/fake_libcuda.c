/* The few driver entry points torch resolves with dlsym from libcuda.so.1; the emulated
 * runtime (fake_cudart.cpp) does the rest. Every device reports an active primary context. */
typedef int CUresult;
typedef int CUdevice;

CUresult cuInit(unsigned int flags) { (void)flags; return 0; }

CUresult cuDriverGetVersion(int* v) { *v = 13000; return 0; }

CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int* flags, int* active) {
  (void)dev;
  if (flags) *flags = 0;
  if (active) *active = 1;
  return 0;
}

CUresult cuGetErrorString(CUresult error, const char** str) {
  (void)error;
  *str = "emulated driver error";
  return 0;
}
