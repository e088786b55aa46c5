"""The ``dpkit`` command.

Each sub-command lives with the code it drives and plugs in through a ``register(subparsers)``
function (listed in ``_COMMAND_MODULES``), so this file stays small and torch-free: a module
that needs torch imports it inside its handler, never at registration time.

Convention: a handler receives the parsed ``argparse.Namespace`` and returns an exit code. User
errors (``ValueError``/``TypeError``/dpkit domain errors) are printed as ONE line on stderr and
exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from dpkit.errors import DPKitError

# modules providing register(subparsers); each adds one or more sub-commands
_COMMAND_MODULES = (
    "dpkit.accountants._cli",   # epsilon, calibrate
    "dpkit.audit._cli",         # risk, audit
    "dpkit._demo",              # demo
)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpkit", description="Differential-privacy budget calculator, "
                     "risk bounds, audits and a private-training demo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module_name in _COMMAND_MODULES:
        try:
            module = import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real missing dependency, not an absent plugin
                raise
            continue
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, TypeError, DPKitError) as exc:
        print(f"dpkit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
