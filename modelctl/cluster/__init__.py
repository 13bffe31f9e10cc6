"""Beyond one machine: a profile as systemd units, Kubernetes manifests and Slurm jobs."""
