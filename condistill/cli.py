"""The ``condistill`` command: ``condistill eval ...`` (recipes train; see recipes/)."""
from __future__ import annotations

import argparse
import json
import sys


def _eval(args) -> int:
    from condistill.evaluate import default_rows, evaluate, markdown_table, parse_rows, skipped_note

    if args.row:
        rows = parse_rows(args.row)
    elif args.student:
        rows = default_rows(args.student, args.baseline, args.condition, args.guidance)
    else:
        print("condistill eval: give --student (and optionally --baseline) or one or more --row", file=sys.stderr)
        return 2
    report = evaluate(args.condition, rows, base=args.base, num_images=args.num_images, batch_size=args.batch_size,
                      seed=args.seed, judge_path=args.judge, out_dir=args.out, device=args.device,
                      cache_dir=args.cache_dir, log=lambda msg: print(msg, file=sys.stderr))
    print(markdown_table(report) + skipped_note(report))
    if args.out:
        print(f"wrote {args.out}/results.json, results.md, samples.png", file=sys.stderr)
    else:
        print(json.dumps(report, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="condistill", description="conditional diffusion distillation tools")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="score students and baselines on held-out synthetic scenes",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--condition", required=True, choices=["edge", "depth", "sr", "inpaint"])
    ev.add_argument("--student", help="distilled adapter folder (rows at 1, 2 and 4 steps)")
    ev.add_argument("--baseline", help="conventionally trained adapter folder (50 DDIM+CFG, 4 DDIM, 4 LCM rows)")
    ev.add_argument("--row", action="append", help="custom row NAME=MODEL[:SAMPLER[:STEPS[:GUIDANCE]]]; MODEL is "
                    "an adapter folder, 'teacher' or 'bicubic'; repeatable (replaces the default rows)")
    ev.add_argument("--base", help="base model (default: the one recorded with the first adapter)")
    ev.add_argument("--guidance", type=float, default=5.0, help="CFG scale of the 50-step rows")
    ev.add_argument("--num-images", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--judge", default="data/judge")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--cache-dir", help="reuse teacher samples across conditions (they ignore the condition)")
    ev.add_argument("--out", help="folder for results.json, results.md and samples.png")
    ev.set_defaults(func=_eval)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
