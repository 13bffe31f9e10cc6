"""`--backend auto`: what runs the network, and why, decided before anything heavy is imported.

On a CPU the model's fp32 ONNX export on ONNX Runtime gives torch's vectors (cosine > 0.999) at
a third of the latency and less than half the memory, and a server that runs a cached export
never imports torch; so auto takes it where ONNX Runtime is installed. int8 is never chosen by
itself: it changes the vectors. On a CUDA device torch runs, in fp16 where the model's outputs
stay finite in it. A model that does not export falls back to torch (app.encoder_factory).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    backend: str  # torch, onnx or openvino
    reason: str  # one clause, for /health, the log and modelctl's status
    half: bool = False  # torch in fp16


def choose(backend: str, device: str) -> Choice:
    """The backend for `--backend` (auto, or one asked for) on `device`."""
    if backend != "auto":
        return Choice(backend, f"asked for (backend {backend})")
    if device.startswith("cuda"):
        return Choice("torch", "auto: a CUDA device, torch in fp16", half=True)
    if device != "cpu":
        return Choice("torch", f"auto: device {device}, torch (the ONNX export runs on the CPU)")
    if importlib.util.find_spec("onnxruntime") is None:
        return Choice("torch", "auto: ONNX Runtime is not installed, torch (pip install onnxruntime)")
    return Choice("onnx", "auto: a CPU with ONNX Runtime, the model's fp32 ONNX export")
