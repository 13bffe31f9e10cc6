"""The bundled sentence server, as a real process on a real port, with the stand-in model
(tests/fake_encoder.py): `python tests/servers/fake_sentence_server.py --model-path fake:... ...`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from servers.sentence.__main__ import main
from servers.sentence.service import ModelFactory
from tests.fake_encoder import FakeEncoder

if __name__ == "__main__":
    factory: ModelFactory = FakeEncoder  # type: ignore[assignment]
    main(sys.argv[1:], model_factory=factory)
