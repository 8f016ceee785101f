"""``python -m fastkd.bench``."""
import sys

from fastkd.bench.cli import main

sys.exit(main())
