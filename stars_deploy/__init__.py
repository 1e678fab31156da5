"""stars-deploy: data-free distillation of ANN teachers into spiking students, and their
deployment to NIR, Loihi (lava-dl netx) and ONNX.

The Python API (stars_deploy/api.py) is importable from here, loaded on first use so that
``import stars_deploy`` stays light::

    import stars_deploy as sd
    run = sd.distill(model, input_shape=(3, 32, 32), normalization="imagenet", data="test.npz")
"""

from .version import __version__

API = ("distill", "convert", "export", "simulate", "check", "report", "load_student", "load_teacher", "doctor")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'stars_deploy' has no attribute {name!r}")
