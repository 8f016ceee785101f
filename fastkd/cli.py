"""The ``fastkd`` command (also ``python -m fastkd``): ``demo``, ``bench`` and ``info``."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastkd", description="fastkd: fused knowledge-distillation loss for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,cache-topk,info}")
    demo = sub.add_parser(
        "demo", help="distill a teacher into a small student on scikit-learn's digits and write a report",
        description="Hinton et al.'s few-labels experiment on scikit-learn's bundled digits (no download): "
                    "a teacher trained on all labels, the same small student trained on a few labelled "
                    "examples with and without the teacher's soft targets. Also runs under "
                    "`torchrun --standalone --nproc_per_node=2 -m fastkd demo`.",
    )
    demo.add_argument("--out", default="demo-output", help="output directory (default: demo-output)")
    demo.add_argument("--quick", action="store_true", help="fewer seeds, epochs and sweep points (well under a minute)")
    demo.add_argument("--seeds", type=_positive_int, default=None,
                      help="seeds for the headline comparison (default: 5, or 3 with --quick)")
    demo.add_argument("--threads", type=_positive_int, default=1,
                      help="torch CPU threads per process (default: 1; the models are tiny)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    if args.command == "demo":
        from fastkd.demo import run_demo

        try:
            run_demo(args.out, quick=args.quick, seeds=args.seeds, progress=not args.no_progress,
                     threads=args.threads)
        finally:
            _shutdown_distributed()
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


def _shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
