"""accel: four published ways of accelerating neural-network training, in JAX."""
