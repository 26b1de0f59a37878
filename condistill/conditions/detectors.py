"""controlnet-aux detectors by name: the control images of the ``paired`` condition, made from photos.

A detector needs either nothing (``canny``, ``lineart_standard``) or its weight files from a
folder or a Hugging Face repository (by default ``lllyasviel/Annotators``, where controlnet-aux's
own loaders look). Files are never downloaded behind the user's back when the hub is offline
(``HF_HUB_OFFLINE=1``): a missing file stops with one line naming what to fetch.

    detector = Detector("hed")                 # weights from the hub cache
    control = detector(photo)                  # an RGB PIL image at the photo's size

Detector quality is controlnet-aux's; condistill measures none of it.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from condistill.conditions.condition import import_controlnet_aux

__all__ = ["DEFAULT_DETECTOR_PATH", "DETECTORS", "Detector", "DetectorSpec", "DetectorWeightsError",
           "detectors_without_weights", "looks_like_local_path"]

DEFAULT_DETECTOR_PATH = "lllyasviel/Annotators"


class DetectorWeightsError(FileNotFoundError):
    """A detector's weight files are not at hand (the message names them and how to fetch them)."""


@dataclass(frozen=True)
class DetectorSpec:
    """How to build and call one controlnet-aux detector."""

    class_name: str
    files: tuple[str, ...] = ()  # weight files in the detector's folder or repository; () = needs none
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of its call


#: the detectors by name; each is deterministic (a control image is a pure function of its photo)
DETECTORS: dict[str, DetectorSpec] = {
    "canny": DetectorSpec("CannyDetector", options={"low_threshold": 100, "high_threshold": 200}),
    "lineart_standard": DetectorSpec("LineartStandardDetector"),
    "hed": DetectorSpec("HEDdetector", ("ControlNetHED.pth",)),
    "scribble_hed": DetectorSpec("HEDdetector", ("ControlNetHED.pth",), {"scribble": True}),
    "pidi": DetectorSpec("PidiNetDetector", ("table5_pidinet.pth",)),
    "scribble_pidi": DetectorSpec("PidiNetDetector", ("table5_pidinet.pth",), {"scribble": True}),
    "lineart": DetectorSpec("LineartDetector", ("sk_model.pth", "sk_model2.pth")),
    "lineart_anime": DetectorSpec("LineartAnimeDetector", ("netG.pth",)),
    "mlsd": DetectorSpec("MLSDdetector", ("mlsd_large_512_fp32.pth",)),
    "normal_bae": DetectorSpec("NormalBaeDetector", ("scannet.pt",)),
    "openpose": DetectorSpec("OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")),
}


def detectors_without_weights() -> list[str]:
    """The detectors that work out of the box (no weight file)."""
    return [name for name, spec in DETECTORS.items() if not spec.files]


def looks_like_local_path(path: str) -> bool:
    """A string that cannot be a Hub id ("name" or "owner/name") is a local path."""
    if os.path.exists(path) or os.path.isabs(path) or path.startswith((".", "~")):
        return True
    return "\\" in path or path.count("/") > 1


class Detector:
    """One named detector: ``Detector(name)(image)`` is the control image of ``image`` (RGB, same size).

    Args:
        name: a key of :data:`DETECTORS`.
        path: the folder or Hub repository holding its weight files.
        detect_resolution: the side the detector works at (its input's short side).
        device: where a network detector runs.
    """

    def __init__(self, name: str, path: str = DEFAULT_DETECTOR_PATH, detect_resolution: int = 512,
                 device: str = "cpu"):
        if name not in DETECTORS:
            raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)} "
                             f"(no weights needed: {', '.join(detectors_without_weights())})")
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ValueError(f"the detector path must be a folder or a Hub repository id, got {path!r}")
        if isinstance(detect_resolution, bool) or not isinstance(detect_resolution, int) or detect_resolution < 64:
            raise ValueError(f"detect_resolution must be an integer >= 64, got {detect_resolution!r}")
        self.name, self.spec = name, DETECTORS[name]
        self.path, self.detect_resolution, self.device = os.fspath(path), detect_resolution, device
        self._model: Any = None

    def _missing(self, files: list[str]) -> DetectorWeightsError:
        where = (f"the folder {self.path!r}" if looks_like_local_path(self.path)
                 else f"the Hugging Face cache ({self.path}, offline)")
        fetch = " ".join(files)
        return DetectorWeightsError(
            f"detector {self.name!r} needs {fetch} from {DEFAULT_DETECTOR_PATH}, not found in {where}; fetch them "
            f"with `hf download {DEFAULT_DETECTOR_PATH} {fetch} --local-dir FOLDER` and pass that folder as "
            f"detector_path, or run once online to fill the cache")

    def check(self) -> str | None:
        """Make sure the weight files are at hand (a local folder, or the hub cache: downloaded there now when
        online); returns the folder to load from, ``None`` for a detector without weights.

        Raises:
            DetectorWeightsError: one line naming the files to fetch.
        """
        if not self.spec.files:
            return None
        if looks_like_local_path(self.path):
            folder = os.path.expanduser(self.path)
            missing = [f for f in self.spec.files if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise self._missing(missing)
            return folder
        from huggingface_hub import hf_hub_download

        from condistill.hub import hub_cache_dir, hub_offline

        missing, folders = [], set()
        for filename in self.spec.files:
            try:
                found = hf_hub_download(self.path, filename, cache_dir=hub_cache_dir(), local_files_only=hub_offline())
                folders.add(os.path.dirname(found))
            except Exception:  # not cached offline, no connection, unknown repository or file
                missing.append(filename)
        if missing:
            raise self._missing(missing)
        return folders.pop() if len(folders) == 1 else self.path  # the snapshot folder holding them all

    def load(self) -> Any:
        """The controlnet-aux detector, loaded once."""
        if self._model is None:
            where = self.check()
            cls = import_controlnet_aux(self.spec.class_name)
            if where is None:
                self._model = cls()
            else:
                try:
                    self._model = cls.from_pretrained(where)
                except Exception as err:  # corrupt or incompatible file
                    raise DetectorWeightsError(
                        f"detector {self.name!r} could not load {' '.join(self.spec.files)} from {where}: "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
                if hasattr(self._model, "to"):
                    self._model = self._model.to(self.device)
        return self._model

    def __call__(self, image: Image.Image) -> Image.Image:
        """The control image of ``image``: RGB, resized back to ``image``'s size. The detector works at
        ``detect_resolution``, or at the image's own short side when that is smaller (a thin line drawn larger
        would fade when shrunk back)."""
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        side = min(self.detect_resolution, min(image.size))
        model = self.load()
        kwargs = dict(detect_resolution=side, image_resolution=side, output_type="np", **self.spec.options)
        accepted = inspect.signature(model.__call__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):  # e.g. no image_resolution
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        out = np.asarray(model(rgb, **kwargs))
        if out.dtype != np.uint8:
            out = np.clip(out * (255.0 if out.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        control = Image.fromarray(out if out.ndim == 3 else out, "RGB" if out.ndim == 3 else "L").convert("RGB")
        return control if control.size == image.size else control.resize(image.size, Image.BILINEAR)
