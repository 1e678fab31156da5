"""Spiking students: Norse LIF networks run for T timesteps with direct encoding, by family.

Families register themselves (``base.register_family``) when their module is imported here;
the registry (``FAMILIES``) is what the CLI, distill, folding and the exporters read.
"""

from . import convnet, resnet  # noqa: F401  (registers the built-in families)
from .base import (FAMILIES, GraphBuilder, StudentConfig, StudentFamily, StudentOutput, build_student,
                   load_student, register_family, save_student, student_family)
from .convnet import SpikingConvNet, convnet_layout
from .folding import fold_conv_bn, fold_student
from .neurons import LIFConfig
from .resnet import SpikingResNet

__all__ = ["FAMILIES", "GraphBuilder", "LIFConfig", "SpikingConvNet", "SpikingResNet", "StudentConfig",
           "StudentFamily", "StudentOutput", "build_student", "convnet_layout", "fold_conv_bn", "fold_student",
           "load_student", "register_family", "save_student", "student_family"]
