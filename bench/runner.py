"""Running a benchmark's async main on uvloop, with Ctrl-C reported as an interruption."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, int], name: str) -> int:
    """Runs `main` on uvloop (asyncio where uvloop is missing) and returns its exit status; on Ctrl-C, 130.
    The benchmarks stop every process they started in their own `finally`, so the message says so."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        return runner(main)
    except KeyboardInterrupt:
        main.close()
        print(f"\n{name}: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
