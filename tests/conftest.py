"""Every test process sees 8 simulated CPU devices (set before jax is imported), so mesh tests run here."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
