"""The machine: process identity and control, GPUs, files and logs, port probes, sockets, health probes.

Nothing here knows records or profiles; the layers above ask it."""
