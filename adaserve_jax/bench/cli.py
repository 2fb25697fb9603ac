"""Argument types shared by the benchmark and simulator command lines."""

from __future__ import annotations

import argparse
import math


def positive(kind):
    """argparse type: `kind(text)`, finite and > 0, else a clear usage error."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v

    return parse
