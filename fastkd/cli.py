"""The ``fastkd`` command (also ``python -m fastkd``): ``demo`` (digits or lm), ``bench`` and ``info``."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _digits_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The digits demo's options: on ``demo`` itself (real defaults) and on ``demo digits`` (SUPPRESS)."""
    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--out", default=d(None), help="output directory (default: demo-output)")
    parser.add_argument("--quick", action="store_true", default=d(False),
                        help="fewer seeds, epochs and sweep points (well under a minute)")
    parser.add_argument("--seeds", type=_positive_int, default=d(None),
                        help="seeds for the headline comparison (default: 5, or 3 with --quick)")
    parser.add_argument("--threads", type=_positive_int, default=d(1),
                        help="torch CPU threads per process (default: 1; the models are tiny)")
    parser.add_argument("--no-progress", action="store_true", default=d(False), help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastkd", description="fastkd: fused knowledge-distillation loss for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,cache-topk,info}")
    demo = sub.add_parser(
        "demo", help="distillation demos: digits (default) or lm; each writes a report",
        usage="fastkd demo [{digits,lm}] [options]",
        description="`fastkd demo` (= `fastkd demo digits`): Hinton et al.'s few-labels experiment on "
                    "scikit-learn's bundled digits (no download): a teacher trained on all labels, the same "
                    "small student trained on a few labelled examples with and without the teacher's soft "
                    "targets. Also runs under `torchrun --standalone --nproc_per_node=2 -m fastkd demo`. "
                    "`fastkd demo lm`: a Llama-style teacher trained on the Python standard library's own "
                    "source, distilled into a smaller student six ways, one of them on-policy (fastkd demo lm --help).",
    )
    _digits_options(demo, suppress=False)
    kinds = demo.add_subparsers(dest="demo", metavar="{digits,lm}")
    # Sub-command options default to SUPPRESS so that `fastkd demo --quick lm` keeps --quick.
    digits = kinds.add_parser("digits", help="the digits experiment (the default)", prog="fastkd demo digits",
                              argument_default=argparse.SUPPRESS)
    _digits_options(digits, suppress=True)
    lm = kinds.add_parser(
        "lm", help="distil a Llama-style teacher on Python's standard library source", prog="fastkd demo lm",
        argument_default=argparse.SUPPRESS,
        description="A byte-level BPE tokenizer trained at run time and a Llama-style teacher trained on the "
                    "Python standard library's source files (no download), then the same smaller student "
                    "trained with cross-entropy only, dense forward KL, JSD, an offline top-k teacher and the "
                    "fused linear loss off-policy, and on its own samples through TRL's DistillationTrainer "
                    "(skipped without the [trl] extra); held-out perplexity, the teacher's NLL of each model's "
                    "samples, step time and peak memory of each in OUT/report.json, report.md and "
                    "perplexity.png. Needs the [hf] extra and matplotlib.",
    )
    lm.add_argument("--out", help="output directory (default: demo-output/lm)")
    lm.add_argument("--quick", action="store_true", help="smaller models and fewer steps (under two minutes)")
    lm.add_argument("--threads", type=_positive_int,
                    help="torch CPU threads (default: 1; on a busy machine a second thread can make steps slower)")
    lm.add_argument("--no-progress", action="store_true", help="no progress lines")
    for name, kind, what in (
        ("teacher-steps", _positive_int, "teacher training steps"),
        ("student-steps", _positive_int, "training steps of every student"),
        ("teacher-hidden", _positive_int, "teacher hidden size"),
        ("student-hidden", _positive_int, "student hidden size"),
        ("teacher-layers", _positive_int, "teacher layers"),
        ("student-layers", _positive_int, "student layers"),
        ("temperature", _positive_float, "distillation temperature"),
        ("alpha", _unit_float, "weight of the distillation term, in [0, 1]"),
        ("seed", int, "seed of the initializations and batches"),
    ):
        lm.add_argument(f"--{name}", type=kind, metavar=name.split("-")[-1].upper(),
                        help=f"{what} (default: the preset's)")
    # bench forwards its arguments untouched to fastkd.bench.main (see main()).
    sub.add_parser("bench", help="benchmark the fused loss against plain PyTorch (fastkd bench --help)",
                   add_help=False)
    from fastkd.integrations import topk_cache_cli

    topk_cache_cli.add_parser(sub)
    info = sub.add_parser("info", help="how the fastkd extension was built")
    info.add_argument("--json", action="store_true", help="print the build info as JSON")
    return parser


def _format_info(info: dict) -> str:
    width = max((len(k) for k in info), default=0)
    lines = []
    for key, value in info.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value) or "(none)"
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)


def _bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("fastkd.bench")  # lazy: only this subcommand needs it
    except ModuleNotFoundError as e:
        if e.name not in ("fastkd.bench", "fastkd"):
            raise
        print("fastkd bench: the benchmark module (fastkd.bench) is not part of this install", file=sys.stderr)
        return 2
    result = bench.main(argv)
    return result if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastkd`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "bench" belongs to the benchmark's own parser, --help included.
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "info":
        import fastkd

        info = fastkd.build_info()
        print(json.dumps(info, indent=2) if args.json else _format_info(info))
        return 0
    if args.command == "cache-topk":
        from fastkd.integrations import topk_cache_cli

        return topk_cache_cli.run(args)
    if args.command == "demo" and getattr(args, "demo", None) == "lm":
        return _demo_lm(args, parser)
    if args.command == "demo":
        from fastkd.demo import run_demo

        try:
            run_demo(args.out or "demo-output", quick=args.quick, seeds=args.seeds, progress=not args.no_progress,
                     threads=args.threads)
        finally:
            _shutdown_distributed()
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


_LM_KNOBS = ("teacher_steps", "student_steps", "teacher_hidden", "student_hidden", "teacher_layers",
             "student_layers", "temperature", "alpha", "seed")


def _demo_lm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.seeds is not None:
        parser.error("--seeds belongs to the digits demo; `fastkd demo lm` trains one seed (see --seed)")
    from fastkd.demo.lm import LMDemoConfig, run_lm_demo

    config = LMDemoConfig.preset(quick=args.quick).with_overrides(
        **{k: getattr(args, k, None) for k in _LM_KNOBS})
    run_lm_demo(args.out or "demo-output/lm", quick=args.quick, config=config, progress=not args.no_progress,
                threads=args.threads)
    return 0


def _shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
