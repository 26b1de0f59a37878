"""``condistill eval``: its command-line parser and what it runs (:func:`condistill.evaluation.evaluate.evaluate`)."""
from __future__ import annotations

import argparse
import json
import sys

from condistill.cli_parsing import check_device, check_output, command_parser, json_object, nonnegative

__all__ = ["eval_command", "eval_parser", "eval_rows"]


def eval_rows(args) -> list:
    """The rows of ``condistill eval``: ``--row`` specs, or the default rows of ``--student`` (and ``--baseline``),
    then with ``--lcm-lora`` the rows of the LCM-LoRA alone and with the ``--baseline``."""
    from condistill.evaluation.lcm_lora import lcm_lora_rows

    rows = _rows(args)
    return rows + (lcm_lora_rows(args.baseline) if args.lcm_lora else [])


def _rows(args) -> list:
    from condistill.evaluation.evaluate import default_rows, parse_rows

    if args.row:
        return parse_rows(args.row)
    if not args.student:
        print("condistill eval: error: give --student (and optionally --baseline) or one or more --row",
              file=sys.stderr)
        raise SystemExit(2)
    from condistill.evaluation.plain_adapter import plain_adapter_kind

    for flag, folder in (("--student", args.student), ("--baseline", args.baseline)):
        if folder is not None and not (flag == "--baseline" and plain_adapter_kind(folder)):
            from condistill.adapters.save_load import read_adapter_config
            try:
                read_adapter_config(folder)
            except FileNotFoundError as error:
                from pathlib import Path

                from condistill.hub import looks_like_repo_id, resolve_pretrained_dir

                if flag == "--baseline" and not Path(folder).exists() and looks_like_repo_id(folder):
                    resolve_pretrained_dir(folder, what="--baseline")  # a hub id: say why it is not at hand
                raise FileNotFoundError(f"{flag} {folder}: {error}") from None
    return default_rows(args.student, args.baseline, args.condition, args.guidance)


def eval_command(args) -> int:
    from condistill.evaluation.evaluate import evaluate, markdown_table, skipped_note

    rows = eval_rows(args)
    for flag, value in (("--prompts", args.prompts), ("--data-options", args.data_options)):
        if value and not args.data:
            raise ValueError(f"{flag} needs --data (the synthetic scenes come with their own prompts and options)")
    nonnegative(args, "num_images", "batch_size", least=1)
    nonnegative(args, "seed")
    check_device(args.device)
    for flag, folder in (("--out", args.out), ("--cache-dir", args.cache_dir)):
        if folder:
            check_output(folder, flag, "folder")
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    from condistill.publish.card import export_identity

    measured = export_identity(args.student) if args.student and not args.row else None  # the export as loaded
    report = evaluate(args.condition, rows, base=args.base, num_images=args.num_images, batch_size=args.batch_size,
                      seed=args.seed, judge_path=args.judge, out_dir=args.out, device=args.device,
                      cache_dir=args.cache_dir, log=log, data=args.data, prompts=args.prompts,
                      data_options=args.data_options, lcm_lora=args.lcm_lora, lcm_lora_scale=args.lcm_lora_scale)
    note = ""
    if args.data:  # the user's own images: conditions made as in training, metrics without the judge
        from condistill.evaluation.user_data import data_note
        note = data_note(report)
    skipped = skipped_note(report)  # after a blank line: a line right below a markdown table would join it
    table = note + markdown_table(report) + ("\n" + skipped if skipped else "")
    print(table)
    if args.student and not args.row:  # a local run's model card records what was measured
        from condistill.publish.card import record_eval
        options = {k: v for k, v in vars(args).items()
                   if not (args.data and k == "judge") and k != "debug"  # no judge with --data
                   and not (k == "lcm_lora_scale" and not args.lcm_lora)}
        record_eval(args.student, table, options, log=log, measured=measured)
    if args.out:
        extra = ", conditions.safetensors" if args.data else ""
        print(f"wrote {args.out}/results.json, results.md, samples.png{extra}", file=sys.stderr)
    else:
        print(json.dumps(report, indent=2))
    return 0


def eval_parser() -> argparse.ArgumentParser:
    ev = command_parser(
        "condistill eval", "Score students and baselines on held-out synthetic scenes (fidelity, Frechet distance on "
        "the judge's features, prompt accuracy, seconds per image), or with --data on your own images (fidelity, "
        "Inception FID, LPIPS, CLIP score where available, seconds per image).",
        "the condition the adapters were trained for (an adapter trained for another one is refused)",
        epilog="Defaults are shown in brackets.")
    ev.add_argument("--student", help="distilled adapter folder (rows at 1, 2 and 4 steps)")
    ev.add_argument("--baseline", help="conventionally trained adapter folder (50 DDIM+CFG, 4 DDIM, 4 LCM rows): a "
                    "condistill export, or a diffusers ControlNet / T2I-Adapter folder or hub id")
    ev.add_argument("--row", action="append", help="custom row NAME=MODEL[:SAMPLER[:STEPS[:GUIDANCE[:START]]]]; MODEL is "
                    "an adapter folder, 'teacher' or 'bicubic'; START, a grid timestep (e.g. 499), starts a codi sampler "
                    "from the condition's own image noised to it (sr, inpaint; the zero latent for edge, depth); repeatable (replaces the default rows)")
    ev.add_argument("--base", help="base model [the one recorded with the first adapter]")
    ev.add_argument("--guidance", type=float, default=4.0,
                    help="CFG scale of the 50-step baseline and teacher rows (every documented result uses 4) [4.0]")
    ev.add_argument("--data", help="score on your own images instead: any training data source (image folder, "
                    "datasets id/folder, .tar shards); the first --num-images usable items in the order seeded by "
                    "--seed, conditions made as in training, metrics without the judge [synthetic held-out scenes]")
    ev.add_argument("--data-options", type=json_object, default=None, metavar="JSON",
                    help="with --data: options of the data source, as for condistill train --data-options (e.g. "
                    "conditioning_dir) [none]")
    ev.add_argument("--lcm-lora", help="an LCM-LoRA of the base (a .safetensors file, a folder holding "
                    "pytorch_lora_weights.safetensors such as a condistill lcm_lora run, or a hub id): adds rows of it "
                    "alone and with --baseline, sampled by LCMScheduler at 2 and 4 steps, guidance 1 and 1.5 [none]")
    ev.add_argument("--lcm-lora-scale", type=float, default=1.0, help="the LCM-LoRA's adapter weight [1.0]")
    ev.add_argument("--prompts", help="with --data: a prompt, or a file of prompts (one a line, cycled), instead of "
                    "the items' captions [the captions]")
    ev.add_argument("--num-images", type=int, default=256, help="held-out scenes (or --data items) scored per row [256]")
    ev.add_argument("--batch-size", type=int, default=64, help="images sampled at once [64]")
    ev.add_argument("--seed", type=int, default=0, help="seed of the scenes and of the sampling noise [0]")
    ev.add_argument("--judge", default="embedded:judge", help="judge folder [embedded:judge, the packaged judge]")
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cuda [cpu]")
    ev.add_argument("--cache-dir", help="folder that keeps teacher samples across conditions (they ignore the "
                    "condition) [no cache]")
    ev.add_argument("--out", help="folder for results.json, results.md and samples.png, checked before the "
                    "evaluation starts [print the JSON instead]")
    return ev
