"""Registers `optimum-cli moeq ...`: the same command as `moeq`, one implementation.

This module is imported on every `optimum-cli` start, so it imports nothing heavy; the package
(torch, transformers) loads only when the command runs.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class MoeqCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="moeq", help="mixed-bit MoE quantization: allocate, quantize, eval, push, card")

    @staticmethod
    def parse_args(parser):
        from argparse import REMAINDER

        parser.add_argument("moeq_args", nargs=REMAINDER, help="the arguments of the moeq command")
        # Hand every following argument, options and --help included, to moeq's own parser.
        parser.prefix_chars = "\0"

    def run(self):
        import sys

        from optimum_moeq.cli import main

        sys.exit(main(self.args.moeq_args, prog="optimum-cli moeq"))


REGISTER_COMMANDS = [MoeqCommand]
