"""Do two runs agree round by round? Compares two results.json files: the same config (but for
`results-dir`), the same rows with their keys in the same order, and every value equal, except
the `..._seconds` keys, the only ones that differ between two runs with one seed. The check
that a change of the code left behaviour as it was:

    python bench/same_rounds.py BEFORE/results.json AFTER/results.json

Exit status 0 when they agree, 1 with every difference listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def differences(before: dict, after: dict) -> list[str]:
    """Every way `after` differs from `before`, but for timing and the results folder."""
    found = []
    config = [(k, before["config"].get(k), after["config"].get(k))
              for k in sorted(set(before["config"]) | set(after["config"])) if k != "results-dir"]
    found += [f"config {k}: {a!r} before, {b!r} after" for k, a, b in config if a != b]
    if len(before["rounds"]) != len(after["rounds"]):
        found.append(f"{len(before['rounds'])} rows before, {len(after['rounds'])} after")
    for old, new in zip(before["rounds"], after["rounds"], strict=False):
        keys_old = [k for k in old if not k.endswith("_seconds")]
        keys_new = [k for k in new if not k.endswith("_seconds")]
        if keys_old != keys_new:
            found.append(f"round {old.get('round')}: keys {keys_old} before, {keys_new} after")
        found += [f"round {old.get('round')} {k}: {old[k]!r} before, {new.get(k)!r} after"
                  for k in keys_old if old[k] != new.get(k)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    found = differences(before, after)
    values = sum(len([k for k in row if not k.endswith("_seconds")]) for row in before["rounds"])
    for line in found:
        print(line)
    print(f"{len(before['rounds'])} rows, {values} values compared: "
          + ("the same" if not found else f"{len(found)} differences"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
