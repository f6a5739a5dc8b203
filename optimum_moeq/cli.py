"""The ``moeq`` command: allocate, quantize, eval, push, card, verify, demo."""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def _config(args: argparse.Namespace):
    from .config import RouterNormConfig

    optional = ("method", "group_size", "attention_bits", "attention_method", "dataset", "nsamples", "seqlen")
    extra = {name: getattr(args, name) for name in optional if getattr(args, name, None) is not None}
    return RouterNormConfig(
        avg_bits=args.avg_bits, bit_levels=args.levels, ranking=args.ranking, zeta=args.zeta,
        reference_model=args.reference_model, **extra,
    )  # fmt: skip


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated bit-widths, e.g. 2,3 or 1,2,3") from None


def _allocate(args) -> int:
    from .commands import allocate_command

    config = _config(args)  # bad values fail before anything is read
    print(allocate_command(args.model, config, json_path=args.json, plot_path=args.plot))
    return 0


def _quantize(args) -> int:
    from .commands import quantize_to_folder

    out = quantize_to_folder(args.model, args.out, _config(args), overwrite=args.overwrite)
    tokenizer = "tokenizer" if (out / "tokenizer_config.json").is_file() else f"no tokenizer: {args.model} has none"
    print(f"wrote {out} (model, allocation, model card; {tokenizer})")
    return 0


def _card(args) -> int:
    from .commands import card_command

    print(f"wrote {card_command(args.folder, base_model=args.base_model)}")
    return 0


def _push(args) -> int:
    from .commands import push_command

    commit = push_command(
        args.folder, args.repo_id, private=args.private, token=args.token, include=args.include, dry_run=args.dry_run
    )
    if commit is not None:
        print(f"pushed {args.folder} to {getattr(commit, 'commit_url', args.repo_id)}")
    return 0


def _verify(args) -> int:
    from .commands import verify_command

    print(verify_command(args.folder))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(avg_bits=args.avg_bits, group_size=args.group_size, method=args.method, out=args.out)
    return 0


def _allocation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--avg-bits", type=float, required=True, help="average bits per expert weight, e.g. 2.5")
    parser.add_argument("--levels", type=_levels, default=(2, 3), help="bit levels, 2 or 3 of them (default 2,3)")
    parser.add_argument("--ranking", default="combined", help="combined (default), router or maxvar")
    parser.add_argument("--zeta", type=float, default=3.0, help="MaxVar ratio of the combined ranking (default 3)")
    parser.add_argument("--reference-model", help="checkpoint before fine-tuning: rank by router-norm change")


def _add_quantize_command(commands, verbose: argparse.ArgumentParser) -> None:
    quantize = commands.add_parser(
        "quantize", parents=[verbose], help="write a quantized checkpoint and its model card"
    )
    quantize.add_argument("model", metavar="MODEL")
    quantize.add_argument("out", metavar="OUT")
    _allocation_options(quantize)
    quantize.add_argument(
        "--method", help="gptq (the default where the family allows it: calibrated, --dataset), rtn or hqq"
    )
    quantize.add_argument(
        "--dataset",
        help="gptq calibration data: a local text file (the model's tokenizer reads it), or builtin (the "
        "default, no download), wikitext2 or c4 (online, through the datasets library)",
    )
    quantize.add_argument("--nsamples", type=int, help="gptq: calibration windows (default 128)")
    quantize.add_argument("--seqlen", type=int, help="gptq: tokens per window (default 512)")
    quantize.add_argument("--group-size", type=int, default=128, help="weights per scale/zero group (default 128)")
    quantize.add_argument("--attention-bits", type=int, help="also quantize attention and dense linears (4 or 8)")
    quantize.add_argument(
        "--attention-method", help="moeq (default: --attention-bits), or bnb_nf4 / bnb_int8 for bitsandbytes' formats"
    )
    quantize.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    quantize.set_defaults(run=_quantize)


def build_parser(prog: str = "moeq") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Mixed-bit Mixture-of-Experts quantization: each expert's bits chosen by router-norm / MaxVar.",
        epilog="MODEL is a local folder or a Hub id. Add --verbose for a traceback on errors.",
    )
    parser.add_argument("--verbose", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verbose = argparse.ArgumentParser(add_help=False)  # also accepted after the command
    verbose.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    allocate = commands.add_parser(
        "allocate", parents=[verbose], help="print the allocation table without loading the model"
    )
    allocate.add_argument("model", metavar="MODEL")
    _allocation_options(allocate)
    allocate.add_argument("--json", help="also write the allocation (bits and signals) as JSON here")
    allocate.add_argument("--plot", help="also draw the allocation heatmap (PNG) here")
    allocate.set_defaults(run=_allocate)

    _add_quantize_command(commands, verbose)

    commands.add_parser(
        "eval", add_help=False, help="lm-eval's own command line (same arguments, same output), quantizer registered"
    )

    push = commands.add_parser(
        "push", parents=[verbose], help="upload a quantized folder to the Hub with its model card"
    )
    push.add_argument("folder", metavar="OUT")
    push.add_argument("repo_id", metavar="REPO_ID")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", help="Hub token (default: the one huggingface-cli login saved)")
    push.add_argument(
        "--include", action="append", default=[], metavar="PATTERN",
        help="also upload the files matching PATTERN (relative to OUT, e.g. 'notes/*.md'); repeatable",
    )  # fmt: skip
    push.add_argument("--dry-run", action="store_true", help="print what would be uploaded, upload nothing")
    push.set_defaults(run=_push)

    card = commands.add_parser("card", parents=[verbose], help="(re-)render OUT/README.md, e.g. after evaluation")
    card.add_argument("folder", metavar="OUT")
    card.add_argument("--base-model", help="Hub id of the model it was quantized from")
    card.set_defaults(run=_card)

    verify = commands.add_parser(
        "verify", parents=[verbose], help="check every packed tensor of OUT against the digests recorded at save"
    )
    verify.add_argument("folder", metavar="OUT")
    verify.set_defaults(run=_verify)

    demo = commands.add_parser(
        "demo", parents=[verbose], help="quantize a small Mixtral built on the spot (no download) and report"
    )
    demo.add_argument("--avg-bits", type=float, default=2.5, help="average expert bits (default 2.5)")
    demo.add_argument("--group-size", type=int, default=64, help="weights per scale/zero group (default 64)")
    demo.add_argument("--method", default="rtn", help="per-expert quantizer: rtn (default) or hqq")
    demo.add_argument("--out", help="folder to keep the quantized checkpoint in (default: a temporary one)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None, prog: str = "moeq") -> int:
    """The ``moeq`` command; ``optimum-cli moeq`` calls it too (see optimum/commands/register)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "--verbose" in argv
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
        if command is not None and argv[command] == "eval":  # everything after it is lm-eval's
            import optimum_moeq  # noqa: F401  (registers the quantizer before lm-eval loads anything)

            from .evaluation import run_lm_eval_cli

            return run_lm_eval_cli(argv[command + 1 :])
        args = build_parser(prog).parse_args(argv)
        return args.run(args)
    except KeyboardInterrupt:
        print("moeq: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line; the traceback only when asked for
        if verbose:
            raise
        print(f"moeq: error: {_one_line(err)}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: a half-written OUT is removed on the way


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        text
        if isinstance(err, (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError))
        else f"{type(err).__name__}: {text}"
    )


if __name__ == "__main__":
    sys.exit(main())
