"""normjax's implementation: private; the public names are re-exported by `normjax`, `normjax.linen` and `normjax.nnx`."""
