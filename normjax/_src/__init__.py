"""normjax's implementation (private): `normjax`, `normjax.linen` and `normjax.nnx` re-export it."""
