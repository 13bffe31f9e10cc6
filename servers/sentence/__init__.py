"""The bundled sentence server: embeddings and rerank with sentence-transformers over HTTP.

Run it with `python -m servers.sentence --model-path ... --task-type embedding|rerank`.
"""
