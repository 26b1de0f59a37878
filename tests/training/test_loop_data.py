"""The training loop on data outside memory: a latent cache, and tar shards read as a stream (seconds each)."""
import io
import tarfile

import pytest
import torch
from safetensors.torch import load_file

from condistill.conditions import get_condition
from condistill.data.cache import CacheMismatchError
from condistill.data.cache_writer import write_cache
from condistill.data.sources import open_source
from condistill.frozen import Base, load_base, native_resolution
from condistill.training.loop import distill
from condistill.training.run_folder import ResumeMismatchError
from helpers import tiny_run_config as _cfg


def _cache(tiny_base, out, condition="edge", dtype="float32"):
    base = load_base(tiny_base)
    res = native_resolution(tiny_base)
    return write_cache(out, base=base, condition=get_condition(condition), seed=0, dtype=dtype,
                       source=open_source("synthetic:train:24", resolution=res), log=lambda _: None)


def _assert_same_weights(a_dir, b_dir, step, atol=0.0):
    for name in ("online.safetensors", "ema.safetensors"):
        a = load_file(str(a_dir / f"checkpoints/step-{step:07d}" / name))
        b = load_file(str(b_dir / f"checkpoints/step-{step:07d}" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def test_a_cache_trains_without_the_encoders_and_like_the_live_data(tiny_base, tmp_path, monkeypatch):
    cache = _cache(tiny_base, tmp_path / "cache")
    live = distill(_cfg(tiny_base, tmp_path / "live"))
    calls = []
    real_prompts = Base.encode_prompts
    monkeypatch.setattr(Base, "encode_images", lambda *a, **k: pytest.fail("the VAE encoder ran on cached data"))
    monkeypatch.setattr(Base, "encode_prompts", lambda self, prompts: calls.append(list(prompts)) or real_prompts(self, prompts))
    cached = distill(_cfg(tiny_base, tmp_path / "cached", data=str(cache)))
    # the steps compute only the unconditional embedding; the 8 validation captions are sampled at the end
    assert [""] in calls and all(prompts == [""] or len(prompts) == 8 for prompts in calls)
    assert (cached / "adapter" / "controlnet").is_dir() and list((cached / "validation").glob("step-*.png"))
    # float32 cache: the same items, latents and embeddings as the live path, so the same run to float noise
    _assert_same_weights(live, cached, 2, atol=1e-5)


def test_a_cache_for_another_condition_is_refused_before_training(tiny_base, tmp_path):
    cache = _cache(tiny_base, tmp_path / "cache", dtype="float16")
    with pytest.raises(CacheMismatchError, match="condition 'edge' != 'sr'.*condistill cache"):
        distill(_cfg(tiny_base, tmp_path / "run", condition="sr", data=str(cache)))
    assert not (tmp_path / "run" / "checkpoints").exists()


def _scene_shards(folder, shards=3, per_shard=8, resolution=16):
    from condistill.world.scenes import generate_scene

    folder.mkdir()
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:02d}.tar", "w") as tar:
            for i in range(per_shard):
                scene = generate_scene(s * per_shard + i, "train")
                png = io.BytesIO()
                scene.image.resize((resolution, resolution)).save(png, format="PNG")
                for ext, data in (("png", png.getvalue()), ("txt", scene.caption.encode())):
                    info = tarfile.TarInfo(f"item{s}{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / ("shard-{00..%02d}.tar" % (shards - 1)))


def test_tar_shards_stream_and_resume_at_the_right_sample(tiny_base, tmp_path):
    spec = _scene_shards(tmp_path / "shards", resolution=native_resolution(tiny_base))
    full = distill(_cfg(tiny_base, tmp_path / "full", data=spec, max_steps=4))
    part = tmp_path / "part"
    distill(_cfg(tiny_base, part, data=spec, max_steps=2))
    distill(_cfg(tiny_base, part, data=spec, max_steps=4, resume="latest"))
    _assert_same_weights(full, part, 4)
    with pytest.raises(ResumeMismatchError, match="streamed data source.*num_workers"):
        distill(_cfg(tiny_base, part, data=spec, max_steps=6, resume="latest", num_workers=1))
