"""Performance: the train-step benchmark, analytic FLOPs (jax-free) and synthetic batches."""
