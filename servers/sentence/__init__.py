"""The bundled sentence server: embeddings and rerank with sentence-transformers over HTTP.

Run it with `python -m servers.sentence --model-path ... --task-type embedding|rerank`.
"""

from importlib import metadata

try:
    __version__ = metadata.version("modelctl")
except metadata.PackageNotFoundError:  # run from a checkout without an install
    __version__ = "0+unknown"
