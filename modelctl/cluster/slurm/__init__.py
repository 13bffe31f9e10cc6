"""Slurm: each server of a profile as a batch job running `modelctl run` (modelctl/cluster/slurm/scripts.py),
submitted, found and cancelled through Slurm's own commands (modelctl/cluster/slurm/commands.py)."""
