"""Examples the docs walk through (docs/byo_model.md)."""
