"""Command line: ``python -m fastconv bench [options]``."""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "bench":
        print("usage: python -m fastconv bench [--help]", file=sys.stderr)
        return 2
    from .bench import main as bench_main

    bench_main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
