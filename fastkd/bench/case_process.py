"""The child side of ``isolate``: reads one case and the options as JSON on stdin, runs it, and prints
the case record as one tagged JSON line on stdout (progress goes to stderr)."""
from __future__ import annotations

import json
import sys

from fastkd.bench.config import Case, Options
from fastkd.bench.isolate import TAG
from fastkd.bench.runner import run_case


def main() -> int:
    """Run the case given on stdin; the parent reads the tagged line."""
    data = json.loads(sys.stdin.read())
    case = Case(**data["case"])
    opts = Options(cases=[case], **data["options"])
    record, notes = run_case(case, opts, lambda m: print(m, file=sys.stderr, flush=True))
    print(TAG + json.dumps({"record": record, "notes": notes}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
