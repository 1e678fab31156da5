"""Distillation: synthesise images from the teacher alone, train the spiking student on them.

    config.py       DistillConfig (every setting of a run) and make_config (objective shorthands)
    options.py      the flat user-facing options of `distill` (CLI flags, pipeline TOML keys)
    loop.py         the synthesise -> pool -> KD loop, resumable, under torchrun too
    synthesis.py    the synthesis objective and the pixel host (DeepInversion)
    generator.py    the generator host (FastDFKD)
    objectives.py   L_BN, L_TAR, L_RCA, KD and the rest, as pure functions
    pool.py         the synthetic pool (bounded memory, spilled to disk)
    augment.py      the KD minibatches' augmentation
    distributed.py  everything torch.distributed
"""

from .config import DEFAULT_BUDGET_S, OBJECTIVES, DistillConfig, make_config, read_run_config
from .loop import distill

__all__ = ["DEFAULT_BUDGET_S", "OBJECTIVES", "DistillConfig", "distill", "make_config", "read_run_config"]
