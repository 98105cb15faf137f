"""The tested dependency set (requirements/lock.txt) against an environment.

    python .ci/lock.py check requirements/lock.txt   # exit 1 unless this environment holds exactly the locked set
    python .ci/lock.py diff requirements/lock.txt    # what this environment has that moved from the lock (exit 0)
    python .ci/lock.py write requirements/lock.txt   # the lock rewritten from this environment (make lock)

Run it with the environment's own python: it reads that environment's installed distributions
(importlib.metadata), as `pip freeze` lists them, with the project itself (editable) left out. A local version label
(`2.13.0+cpu`: the CPU build of torch) matches its public version, as a pip constraint does."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PROJECT = "kakehashi"
HEADER = """\
# The tested set: what `make install`, `make test` and .ci/run install (pip constraints; .ci/lock.py checks the venv
# against it). pyproject.toml keeps ranges for installs into other environments. Regenerate with `make lock`
# after `make test-latest` passes on the newest releases.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    return version.split("+", 1)[0]


def locked(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in (PROJECT, "pip", "setuptools", "wheel"):
            found[canonical(name)] = public(dist.version)
    return found


def differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(pins.keys() | have.keys()):
        want, got = pins.get(name), have.get(name)
        if want == got:
            continue
        if got is None:
            lines.append(f"missing   {name}=={want}")
        elif want is None:
            lines.append(f"unlocked  {name}=={got}")
        else:
            lines.append(f"moved     {name} {want} -> {got}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("check", "diff", "write"):
        print(__doc__, file=sys.stderr)
        return 2
    command, path = argv[0], Path(argv[1])
    if command == "write":
        have = installed()
        path.write_text(HEADER + "".join(f"{name}=={have[name]}\n" for name in sorted(have)), encoding="utf-8")
        print(f"{path}: {len(have)} pins")
        return 0
    pins = locked(path)
    lines = differences(pins, installed())
    for line in lines:
        print(line)
    if command == "diff":
        print(f"{len(lines)} of {len(pins)} locked packages differ from {path}" if lines else f"as {path}: nothing moved")
        return 0
    if lines:
        print(f"lock: this environment is not {path} ({len(lines)} differences above); "
              f"`make clean install` rebuilds it", file=sys.stderr)
        return 1
    print(f"lock: the environment holds exactly {path} ({len(pins)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
