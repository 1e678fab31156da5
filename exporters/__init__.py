"""Exporters: a run's student -> NIR (the hub), NIR -> Loihi fixed point (netx .net), ONNX.

The export kinds and their files are in registry.py; ``export_run`` dispatches to them."""
