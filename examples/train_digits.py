"""Private training on scikit-learn's bundled digits, with ε and an in-run audit.

The same run as ``dpkit demo`` (see dpkit/_demo.py): a small MLP trained with DP-SGD at a target
(ε, δ), next to a non-private baseline, with closed-form membership-inference bounds and a one-shot
empirical ε̂ from canary gradients inserted into the same run.

    python examples/train_digits.py [--target-epsilon 3] [--epochs 15] [--json]
"""

import sys

from dpkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
