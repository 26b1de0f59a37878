"""Depth condition: a disparity-like depth map (1 = near, 0 = far), replicated to RGB.

The map comes either from the record itself (the synthetic scenes, or a dataset with
a depth column, give exact depth) or from a monocular depth estimator of controlnet-aux
(MiDaS / DPT, ZoeDepth) loaded from a local folder or a Hugging Face Hub repository.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from condistill.presets import CPU, SD15_GPU, SDXL_GPU, GUIDED
from condistill.conditions.condition import Condition, FidelityUnavailable, import_controlnet_aux, register_condition
from condistill.conditions.detectors import looks_like_local_path
from condistill.data.record import Record

__all__ = ["DepthCondition", "EstimatorWeightsError", "ESTIMATORS"]

# estimator -> (controlnet-aux class, {model_type: default weight file}, default model_type)
ESTIMATORS: dict[str, tuple[str, dict[str, str], str]] = {
    "midas": (
        "MidasDetector",
        {"dpt_hybrid": "dpt_hybrid-midas-501f0c75.pt", "dpt_large": "dpt_large-midas-2f21e586.pt"},
        "dpt_hybrid",
    ),
    "zoe": ("ZoeDetector", {"zoedepth": "ZoeD_M12_N.pt", "zoedepth_nk": "ZoeD_M12_NK.pt"}, "zoedepth"),
}
SOURCES = ("auto", "record", "estimator")
DEFAULT_ESTIMATOR_PATH = "lllyasviel/Annotators"
_RANGE_TOLERANCE = 1e-4


#: why a depth condition that reads the data's own depth cannot measure generated images (no estimator to run)
DEPTH_RECORD_SKIP = ("skipped: depth of generated images needs an estimator (pass condition option "
                     "source=estimator)")


class EstimatorWeightsError(FileNotFoundError):
    """The depth estimator's weights could not be found or loaded."""



class DepthCondition(Condition):
    """Depth as a ``float32 [3, H, W]`` tensor in ``[0, 1]`` (1 = near), channels identical.

    Options:
        source: ``"record"`` uses ``record.depth`` (error if missing); ``"estimator"``
            always runs the estimator; ``"auto"`` (default) uses ``record.depth`` when
            present and the estimator otherwise.
        normalize: stretch every map to span the full ``[0, 1]`` (min-max), as the
            estimators do; default ``False`` keeps record depth exactly as given.
        estimator: ``"midas"`` (MiDaS v3 DPT, default) or ``"zoe"`` (ZoeDepth).
        estimator_path: local folder holding the weight file, or a Hub repository id
            (default ``"lllyasviel/Annotators"``, which holds all of them).
        estimator_model_type: ``"dpt_hybrid"`` (default) / ``"dpt_large"`` for midas,
            ``"zoedepth"`` (default) / ``"zoedepth_nk"`` for zoe.
        estimator_filename: weight file name; default is the one matching the model type.
        detect_resolution: short side the estimator works at (default 512); its output
            is resized back to the image size.
        device: torch device for the estimator (default ``"cpu"``).

    The estimator is loaded on first use (or by :meth:`load_estimator`); when its
    weights are unavailable an :class:`EstimatorWeightsError` says which file is needed
    and how to provide it. With ``source="estimator"`` a local folder is checked when the
    condition is built, and :meth:`check` (which a training run calls before it loads the
    base) makes sure a Hub repository's weight file is in the cache.
    """

    name = "depth"
    channels = 3
    #: the recipe of ``condistill train depth`` (:mod:`condistill.presets`)
    description = "depth-to-image: the condition is a depth map (the dataset's own depth or a depth estimator)."
    presets = {
        "cpu-demo": dict(_help="embedded teacher + synthetic scenes on CPU (400 steps; 11-13 minutes as one of three "
                               "runs sharing 2 cores, see docs/results.md)", output_dir="runs/depth", max_steps=400,
                         validate_every=100, **CPU),
        "sd15-gpu": dict(_help="SD 1.5 on one GPU with a local MiDaS folder", output_dir="runs/depth-sd15", **SD15_GPU,
                         **GUIDED,
                         condition_options={"source": "estimator", "estimator_path": "lllyasviel/Annotators"}),
        "sdxl-gpu": dict(_help="SDXL base 1.0 on one GPU (1024 px, bf16) with a local MiDaS folder",
                         output_dir="runs/depth-sdxl", **SDXL_GPU, **GUIDED,
                         condition_options={"source": "estimator", "estimator_path": "lllyasviel/Annotators"}),
    }
    fidelity = ("depth_error", "lower")

    @classmethod
    def teacher_bar(cls, s, t):
        return f"error <= teacher / 2 ({t['depth_error'] / 2:.3f})", s["depth_error"] <= t["depth_error"] / 2

    def fidelity_scores(self, images, data, judge):
        """Depth of the images against the input depth (scale- and shift-invariant error): the judge's estimate, or
        on a user's data (no judge) this condition's own estimator."""
        from condistill.evaluation.metrics import depth_error
        from condistill.plots import to_pil

        target = data["conditioning"][:, 0]
        if judge is not None:
            return {"depth_error": float(depth_error(judge.depth(images), target))}
        if self.source == "record":
            raise FidelityUnavailable(DEPTH_RECORD_SKIP)
        predicted = []
        for image in images:
            depth = torch.from_numpy(self.estimate(to_pil(image)))
            if self.normalize:
                lo, hi = float(depth.min()), float(depth.max())
                if hi - lo > 1e-6:
                    depth = (depth - lo) / (hi - lo)
            predicted.append(depth.clamp(0, 1))
        return {"depth_error": float(depth_error(torch.stack(predicted), target))}

    def __init__(self, *, source: str = "auto", normalize: bool = False, estimator: str = "midas",
                 estimator_path: str = DEFAULT_ESTIMATOR_PATH, estimator_model_type: str | None = None,
                 estimator_filename: str | None = None, detect_resolution: int = 512, device: str = "cpu"):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
        _, files, _ = ESTIMATORS[estimator]
        if estimator_model_type is not None and estimator_model_type not in files:
            raise ValueError(
                f"estimator_model_type for {estimator!r} must be one of {sorted(files)} (or None for the default), "
                f"got {estimator_model_type!r}"
            )
        if not isinstance(estimator_path, (str, os.PathLike)) or not os.fspath(estimator_path):
            raise ValueError(f"estimator_path must be a folder path or a Hub repository id, got {estimator_path!r}")
        if estimator_filename is not None and (not isinstance(estimator_filename, str) or not estimator_filename):
            raise ValueError(f"estimator_filename must be a file name or None, got {estimator_filename!r}")
        if isinstance(detect_resolution, bool) or not isinstance(detect_resolution, int) or detect_resolution < 64:
            raise ValueError(f"detect_resolution must be an integer >= 64, got {detect_resolution!r}")
        if not isinstance(device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
        self.source = source
        self.normalize = normalize
        self.estimator = estimator
        self.estimator_path = os.fspath(estimator_path)
        self.estimator_model_type = estimator_model_type
        self.estimator_filename = estimator_filename
        self.detect_resolution = detect_resolution
        self.device = device
        self._detector: Any = None
        if source == "estimator" and looks_like_local_path(self.estimator_path):
            self._local_weights()  # fail early on a missing folder or file

    # ------------------------------------------------------------------ estimator
    def _weights(self) -> tuple[str, str, str]:
        class_name, files, default_type = ESTIMATORS[self.estimator]
        model_type = self.estimator_model_type or default_type
        return class_name, model_type, self.estimator_filename or files[model_type]

    def _options_with(self, **changes: Any) -> tuple[str, str]:
        """This condition's options that differ from the defaults, with ``changes``: as the
        command's ``--condition-options`` JSON and as ``get_condition`` keyword arguments."""
        defaults = {name: p.default for name, p in inspect.signature(DepthCondition.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        options = {name: getattr(self, name) for name in defaults
                   if name not in changes and getattr(self, name) != defaults[name]}
        options.update(changes)
        python = ", ".join(["'depth'"] + [f"{name}={value!r}" for name, value in options.items()])
        return f"--condition-options '{json.dumps(options)}'", f"get_condition({python})"

    def _how_to_provide(self, filename: str) -> str:
        folder_cli, folder_python = self._options_with(estimator_path="<folder>")
        return (
            f"Download it once on a machine with internet access, e.g. "
            f"`hf download {DEFAULT_ESTIMATOR_PATH} {filename} --local-dir <folder>`, "
            f"then pass {folder_cli} (Python: {folder_python}), or download it into the Hugging Face cache "
            f"and keep the Hub id as estimator_path. Alternatively use a data source that provides depth "
            f"(a depth column, or the built-in synthetic scenes) with --condition-options '{{\"source\": \"record\"}}' "
            f"(Python: source='record')."
        )

    def check(self) -> None:
        """Make sure the estimator's weight file is at hand, without loading the estimator.

        Only ``source="estimator"`` needs the estimator for certain (``"auto"`` needs it only for
        records without depth). A local folder must hold the weight file; from a Hub repository the
        file is fetched into the Hugging Face cache now, as loading would (offline, it must be there).

        Raises:
            EstimatorWeightsError: the file is missing; the message says how to provide it.
        """
        if self.source != "estimator":
            return
        if looks_like_local_path(self.estimator_path):
            self._local_weights()
            return
        from huggingface_hub import hf_hub_download

        from condistill.hub import hub_offline

        _, _, filename = self._weights()
        offline = hub_offline()
        try:
            hf_hub_download(self.estimator_path, filename, local_files_only=offline)
        except Exception as err:  # not cached offline, no connection, unknown repository or file
            why = ("is not in the Hugging Face cache, and offline mode (HF_HUB_OFFLINE=1) forbids downloading it"
                   if offline else f"could not be downloaded ({type(err).__name__}: {_first_line(err)})")
            raise EstimatorWeightsError(
                f"Depth estimator {self.estimator!r} needs the weight file {filename!r} of Hub repository "
                f"{self.estimator_path!r}, which {why}. " + self._how_to_provide(filename)
            ) from err

    def _local_weights(self) -> str:
        _, _, filename = self._weights()
        folder = os.path.expanduser(self.estimator_path)
        if not os.path.isdir(folder):
            raise EstimatorWeightsError(
                f"Depth estimator {self.estimator!r} needs the weight file {filename!r}, but the folder "
                f"{folder!r} does not exist. " + self._how_to_provide(filename)
            )
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            raise EstimatorWeightsError(
                f"Depth estimator {self.estimator!r} needs the weight file {filename!r}, which is not in "
                f"{folder!r}. " + self._how_to_provide(filename)
            )
        return folder

    def load_estimator(self) -> Any:
        """Load (once) and return the controlnet-aux depth detector.

        Raises:
            EstimatorWeightsError: the weight file is not in the local folder, or the Hub
                download failed (offline, unknown repository, missing file); the message
                names the file and how to provide it.
        """
        if self._detector is not None:
            return self._detector
        class_name, model_type, filename = self._weights()
        local = looks_like_local_path(self.estimator_path)
        where = self._local_weights() if local else self.estimator_path
        detector_cls = import_controlnet_aux(class_name)
        try:
            detector = detector_cls.from_pretrained(where, model_type=model_type, filename=filename)
        except Exception as err:  # offline hub, corrupt file, incompatible checkpoint...
            origin = f"folder {where!r}" if local else f"Hub repository {where!r}"
            raise EstimatorWeightsError(
                f"Could not load depth estimator {self.estimator!r} ({model_type}, weight file {filename!r}) "
                f"from {origin}: {type(err).__name__}: {_first_line(err)}. " + self._how_to_provide(filename)
            ) from err
        self._detector = detector.to(self.device)
        return self._detector

    def estimate(self, image: Image.Image) -> np.ndarray:
        """Estimated depth of ``image`` as ``float32 [H, W]`` in ``[0, 1]``, 1 = near."""
        detector = self.load_estimator()
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        out = detector(rgb, detect_resolution=self.detect_resolution,
                       image_resolution=self.detect_resolution, output_type="np")
        out = np.asarray(out)
        grey = out[..., 0] if out.ndim == 3 else out
        if grey.dtype != np.uint8:
            raise RuntimeError(f"{self.estimator} detector returned {grey.dtype}, expected a uint8 depth image")
        resized = Image.fromarray(grey, "L").resize(image.size, Image.BILINEAR)
        return np.asarray(resized, dtype=np.float32) / 255.0

    # ------------------------------------------------------------------ the condition
    def depth_map(self, record: Record) -> np.ndarray:
        """The ``float32 [H, W]`` depth map (1 = near) this condition uses for ``record``."""
        use_record = self.source == "record" or (self.source == "auto" and record.depth is not None)
        if use_record:
            depth = _record_depth(record)
        else:
            depth = self.estimate(record.image)
        if self.normalize:
            lo, hi = float(depth.min()), float(depth.max())
            if hi - lo > 1e-6:
                depth = (depth - lo) / (hi - lo)
        return np.clip(depth, 0.0, 1.0).astype(np.float32)

    def compute(self, record: Record, seed: int) -> torch.Tensor:
        """Depth of ``record`` replicated to three channels; ``seed`` is unused."""
        depth = torch.from_numpy(np.ascontiguousarray(self.depth_map(record)))
        return depth.unsqueeze(0).repeat(3, 1, 1)


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, without its closing full stop (a sentence follows it)."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__).rstrip(". ")


def _record_depth(record: Record) -> np.ndarray:
    depth = record.depth
    if depth is None:
        raise ValueError(
            f"record {record.key or '(no key)'} has no depth but the depth condition has source='record'; "
            "use a data source with a depth column, or source='auto'/'estimator' to estimate it."
        )
    depth = np.asarray(depth)
    width, height = record.image.size
    if depth.shape != (height, width):
        raise ValueError(
            f"record depth has shape {depth.shape} but the image is {height}x{width}; "
            "the data source must give depth as [H, W] at the image's resolution."
        )
    if not np.issubdtype(depth.dtype, np.floating):
        raise ValueError(
            f"record depth must be float in [0, 1] (1 = near), got dtype {depth.dtype}; "
            "convert it in the data source (e.g. divide 8-bit depth images by 255)."
        )
    depth = depth.astype(np.float32)
    if not np.isfinite(depth).all():
        raise ValueError("record depth contains NaN or infinite values; fill them in the data source")
    if depth.min() < -_RANGE_TOLERANCE or depth.max() > 1 + _RANGE_TOLERANCE:
        raise ValueError(
            f"record depth spans [{depth.min():.4g}, {depth.max():.4g}] but must be disparity-like in [0, 1] "
            "(1 = near, 0 = far); convert metric depth in the data source, e.g. d = 1 / depth rescaled to [0, 1]."
        )
    return depth


register_condition(DepthCondition)
