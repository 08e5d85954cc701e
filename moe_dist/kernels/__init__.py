"""The experts' grouped GEMMs, with the device-specific kernels sealed inside this package."""
