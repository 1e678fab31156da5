"""Teacher ANNs: named architectures, specs, normalisation, loading, and the digits demo teacher."""

from .models import CIFAR10_CLASSES, DIGITS_CLASSES, CifarResNet, DigitsCNN
from .spec import (ARCHITECTURES, NORMALIZATIONS, Architecture, Normalizer, TeacherSpec, batchnorm_layers,
                   build_teacher, load_teacher, parse_normalization)

__all__ = ["ARCHITECTURES", "NORMALIZATIONS", "Architecture", "CIFAR10_CLASSES", "CifarResNet",
           "DIGITS_CLASSES", "DigitsCNN", "Normalizer", "TeacherSpec", "batchnorm_layers", "build_teacher",
           "load_teacher", "parse_normalization"]
