"""One linear's math on one device: no files, no ranks, no model
(requant, factor, refit, products, rtn, residual, hessian, kernels)."""
