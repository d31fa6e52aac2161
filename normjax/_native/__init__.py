"""Sources of normjax's native CPU kernels (built by setup.py; see normjax/_rows.py)."""
