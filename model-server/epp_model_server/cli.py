"""`epp-model-server`: the command line entry point."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from .config import parse_args
from .hf_tokenizer import TokenizerLoadError
from .kv_publisher import KVEventsConfigError
from .lora import LoRAConfigError
from .server import ConfigurationError, ModelServer, serve


def _ready(server: ModelServer) -> None:
    print(server.describe(), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop  # noqa: PLC0415

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    try:
        with runner:
            runner.run(serve(cfg, on_ready=_ready))
    except (ConfigurationError, KVEventsConfigError, LoRAConfigError, TokenizerLoadError, OSError, ValueError) as exc:
        print(f"epp-model-server: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
