"""The ``moeq`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(avg_bits=args.avg_bits, group_size=args.group_size, method=args.method, out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeq", description="Mixed-bit Mixture-of-Experts quantization (router-norm / MaxVar allocation)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="quantize a small Mixtral built on the spot (no download) and report on it"
    )
    demo.add_argument("--avg-bits", type=float, default=2.5, help="average expert bits (default 2.5)")
    demo.add_argument("--group-size", type=int, default=64, help="weights per scale/zero group (default 64)")
    demo.add_argument("--method", default="hqq", help="per-expert quantizer: hqq (default) or rtn")
    demo.add_argument("--out", help="folder to keep the quantized checkpoint in (default: a temporary one)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:
        print(f"moeq: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
