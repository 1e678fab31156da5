"""stars-deploy: data-free distillation of ANN teachers into spiking students, and their
deployment to NIR, Loihi (lava-dl netx) and ONNX."""

__version__ = "0.1.0"
