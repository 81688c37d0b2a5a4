"""How runs reach hardware: sweep preparation, the local GPU scheduler, SLURM glue."""
