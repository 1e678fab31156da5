"""Hardware facts, one module per chip: bit widths, shifts, limits and energy per operation.

Exporters, file formats and emulators import these numbers from here and nowhere else."""
