"""Training-core overhead benchmark (issue: private training core): dpkit vs non-private vs Opacus
(hooks and ghost) on a small CNN and a transformer-like model. Same harness and models as
``benchmarks/bk.py``; this entry point runs them with default settings.

    python benchmarks/overhead.py [--json] [--rounds N] [--no-memory]
"""

import sys

sys.path.insert(0, "benchmarks")
import bk  # noqa: E402

if __name__ == "__main__":
    bk.main(sys.argv[1:])
