"""One linear's math on one device: no files, no ranks, no model (requant, rtn, hessian, kernels)."""
