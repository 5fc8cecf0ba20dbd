"""fastxc.kernels: fused crosscoder / SAE kernels (depends on torch and triton only)."""
