"""``condistill eval --data SRC``: score students and baselines on the user's own images.

The held-out items: ``SRC`` is any training data source spec (:func:`condistill.data.sources.open_source`:
an image folder, a ``datasets`` id or folder, ``.tar`` shards), opened at the adapters' training resolution
(the base's native one without an adapter row).
Its items are visited in a seeded order (a ``torch.randperm`` of the item indices drawn with
``torch.Generator().manual_seed(seed)``; stream-only sources are read into memory first) and the
first ``num_images`` usable ones (items the source skips, e.g. corrupt files, are passed over)
are evaluated. The same ``SRC``, ``num_images`` and ``seed`` always give the same items. Pass
images the adapter was not trained on (e.g. a ``test`` split or a separate folder).

Each item's condition is made from its image exactly as in training: a
:class:`~condistill.data.dataset.ConditionDataset` with the condition rebuilt from the first
adapter row's saved condition config (the same per-item condition seeds as the synthetic eval).
Every row samples those conditions with the same prompts (the items' captions, or ``prompts``)
and the same sampling seeds (``seed + first index of the batch``, as in the synthetic eval).

Metrics, none of which needs the judge:

- fidelity: edge F1 of canny(output) against the input edges (edge); for depth, the depth of
  the output through the condition's own depth estimator, scale-and-shift aligned, against the
  input depth (skipped when the condition reads depth from the records: ``source=record``);
  PSNR and SSIM against the real image (sr); PSNR inside the hole (inpaint);
- realism and prompt adherence, when their packages and weights are present
  (:mod:`condistill.evaluation.third_party`): Inception FID against the real items, LPIPS against
  the real image (sr, inpaint) and the CLIP score of each output against its prompt;
- seconds per image, measured as in the synthetic eval (warm-up, median of passes).

Every metric that cannot run is listed in ``report["skipped_metrics"]`` with why and how to enable it.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from condistill.data.dataset import ConditionDataset, collate
from condistill.data.sources import IndexedSource, open_source

from condistill.conditions.condition import FidelityUnavailable
from condistill.conditions.depth import DEPTH_RECORD_SKIP  # noqa: F401 - importable here as before



def read_prompts(prompts: str | None) -> list[str] | None:
    """``prompts`` as a list: the non-empty lines of a file when it names one, else the one text."""
    if prompts is None:
        return None
    path = Path(prompts).expanduser()
    if path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"--prompts file {prompts} holds no prompt (one prompt per line)")
        return lines
    return [prompts]


def held_out_indices(dataset: ConditionDataset, num_images: int, seed: int) -> list[int]:
    """The first ``num_images`` usable item indices of ``dataset`` in the order seeded by ``seed``."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    if not isinstance(dataset.source, IndexedSource):
        return order[:num_images]  # stream sources are read into memory: every record is usable
    chosen = []
    for index in order:
        if dataset.source.load(index) is not None:
            chosen.append(index)
            if len(chosen) == num_images:
                break
    return chosen


def load_items(spec: str, cond, resolution: int, num_images: int, seed: int, prompts: list[str] | None,
               options: dict | None = None) -> dict:
    """The collated held-out items of ``spec`` opened with ``options`` (conditions made as in training), with
    their prompts."""
    try:
        source = open_source(spec, resolution=resolution, conditioning=cond.record_conditioning, **(options or {}))
        dataset = ConditionDataset(source, cond, resolution, seed=seed + 12345)
        indices = held_out_indices(dataset, num_images, seed)
    except KeyError as error:  # a missing column, named by the source
        raise ValueError(f"--data {spec}: {error.args[0] if error.args else error}") from error
    except (OSError, ValueError) as error:
        raise ValueError(f"--data {spec}: {error}") from error
    if not indices:
        raise ValueError(f"--data {spec}: no usable item")
    data = collate([dataset[i] for i in indices])
    if prompts is not None:
        data["caption"] = [prompts[i % len(prompts)] for i in range(len(indices))]
    data["index"] = indices
    return data


def fidelity(name: str, cond, images: torch.Tensor, data: dict, skipped: dict) -> dict:
    """The judge-free fidelity metrics of ``images [N,3,H,W]`` in [0, 1] against the items ``data``: the condition's
    own (:meth:`~condistill.conditions.Condition.fidelity_scores` without a judge). One that cannot be measured is
    recorded in ``skipped`` with the reason, once, and the other metrics go on."""
    key = (cond.fidelity or (None,))[0]
    if key is None or key in skipped:
        return {}
    try:
        return cond.fidelity_scores(images, data, None)
    except FidelityUnavailable as why:
        skipped[key] = f"{key} {why}"
    except Exception as error:  # noqa: BLE001 - e.g. missing estimator weights: say why, keep the other metrics
        skipped[key] = f"{key} skipped: the {name} condition could not measure it ({type(error).__name__}: {error})"
    return {}


def _say(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)
    else:
        warnings.warn(message, stacklevel=3)


class DataItems:
    """The items of ``--data`` for :func:`condistill.evaluation.evaluate.evaluate` and their judge-free metrics.

    The prompts and the items are read here, before the base loads, so a bad ``--data`` or ``--prompts`` stops
    the evaluation at once."""

    def __init__(self, cond, resolution: int, data: str, num_images: int, seed: int,
                 prompts: str | list[str] | None, log: Callable[[str], None] | None, options: dict | None = None):
        prompt_list = read_prompts(prompts) if isinstance(prompts, str) else prompts
        self.cond, self.data, self.seed, self.log = cond, data, seed, log
        self.items = load_items(data, cond, resolution, num_images, seed, prompt_list, options)
        self.prompts = self.items["caption"]
        self.skipped: dict[str, str] = {}

    def score(self, images: torch.Tensor) -> dict:
        return fidelity(self.cond.name, self.cond, images, self.items, self.skipped)

    def finish(self, report: dict, batch_size: int) -> dict:
        """``report`` with the items drawn, their prompts and the sampling seeds; the fidelity skips said once."""
        for reason in self.skipped.values():
            _say(self.log, reason)
        n, seed = len(self.items["index"]), self.seed
        extra = {"data": self.data, "num_images": n, "num_images_requested": report["num_images"],
                 "selection": f"the first {n} usable items of {self.data} in the order torch.randperm(len, "
                              f"generator=manual_seed({seed}))",
                 "items": [{"key": k, "index": i, "prompt": p} for k, i, p in
                           zip(self.items["key"], self.items["index"], self.items["caption"])],
                 "sampling_seeds": [seed + start for start in range(0, n, batch_size)]}
        return {**report, **extra}

    def write(self, out: Path, report: dict) -> None:
        """``conditions.safetensors`` (the conditions every row sampled), and the data line atop ``results.md``."""
        save_file({"conditioning": self.items["conditioning"].contiguous()}, str(out / "conditions.safetensors"))
        (out / "results.md").write_text(data_note(report) + "\n" + (out / "results.md").read_text())


def data_note(report: dict) -> str:
    """One line naming the data source and how its items were drawn."""
    return (f"Data: `{report['data']}`, {report['selection']}; conditions made from each image as in training; "
            "metrics without the judge.\n\n")


__all__ = ["DataItems", "held_out_indices", "read_prompts", "data_note", "DEPTH_RECORD_SKIP"]
