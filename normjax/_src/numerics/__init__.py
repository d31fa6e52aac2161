"""The reference maths in `jax.numpy`: statistics, normalize and its derivative, rounding pins."""
