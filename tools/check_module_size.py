"""Fail when a core module outgrows one concept (STYLE.md habit 8: at most 400 lines)."""

import sys
from pathlib import Path

LIMIT = 400


def main() -> int:
    """Print each oversized module under samkv_integrations/ and return 1 if any."""
    too_big = [
        (path, n)
        for path in sorted(Path("samkv_integrations").rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > LIMIT
    ]
    for path, n in too_big:
        print(f"{path}: {n} lines (limit {LIMIT})")
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
