"""Slurm: each server of a profile as a batch job running `modelctl run` (modelctl/slurm/scripts.py),
submitted, found and cancelled through Slurm's own commands (modelctl/slurm/commands.py)."""
