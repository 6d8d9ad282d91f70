"""Entry point of the subprocess probes: ``python -m metaprep.bench.throughput MODE JSON`` (see :mod:`.probes`)."""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports DeepSpeed
    from metaprep.bench.throughput.probes import PROBES

    if len(argv) != 2 or argv[0] not in PROBES:
        print(f"usage: python -m metaprep.bench.throughput {{{','.join(PROBES)}}} JSON", file=sys.stderr)
        return 2
    print(json.dumps(PROBES[argv[0]](json.loads(argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
