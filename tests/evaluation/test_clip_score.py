"""Optional CLIPScore: the skip path (no CLIP model on the machine), a stand-in backend through
``set_backend``, and the real loading path on a tiny randomly initialised CLIP saved locally."""
import math
import warnings

import pytest
import torch

from condistill.evaluation import clip_score as cs
from condistill.evaluation import backends
from condistill.evaluation import third_party as om
import helpers

torch_single_thread = helpers.torch_single_thread  # module-scoped autouse fixture: one CPU thread


@pytest.fixture
def no_clip(monkeypatch, tmp_path):
    """An empty Hugging Face cache, no CONDISTILL_CLIP_MODEL and no injected backend."""
    empty = tmp_path / "hf"
    empty.mkdir()
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.delenv(cs.CLIP_MODEL_ENV, raising=False)
    monkeypatch.setattr(backends, "BACKENDS", {})
    return empty / "hub"


@pytest.fixture
def fake_clip(monkeypatch):
    """A deterministic stand-in: score = 100 * mean pixel value, recording the prompts it saw."""
    seen = []

    def factory(device):
        def score(images, prompts):
            seen.append(list(prompts))
            assert images.shape[0] == len(prompts)
            return 100 * images.mean((1, 2, 3))
        return score

    monkeypatch.setattr(backends, "BACKENDS", {})
    om.set_backend("clip_score", factory)
    return seen


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A tiny random CLIPModel + tokenizer + CLIPImageProcessor saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = helpers.make_tiny_tokenizer(tmp_path_factory.mktemp("tok"), model_max_length=16)
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_status_false_with_how_to_when_no_model(no_clip, monkeypatch, tmp_path):
    ok, reason = om.clip_status()
    assert not ok and reason.startswith("CLIPScore skipped")
    assert "openai/clip-vit-base-patch32" in reason and str(no_clip) in reason
    assert "hf download openai/clip-vit-base-patch32" in reason and "CONDISTILL_CLIP_MODEL" in reason
    assert om.STATUS["clip_score"]() == (ok, reason) and "clip_score" in om.METRICS
    x = torch.rand(2, 3, 16, 16)
    assert om.compute_optional(x, ["a", "b"], "clip_score") is None
    with pytest.raises(RuntimeError, match="CLIPScore skipped"):
        om.load_clip()
    monkeypatch.setenv(cs.CLIP_MODEL_ENV, str(tmp_path / "nowhere"))
    ok, reason = om.clip_status()
    assert not ok and "nowhere" in reason and "is not an existing folder" in reason
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    monkeypatch.setenv(cs.CLIP_MODEL_ENV, str(tmp_path / "half"))
    ok, reason = om.clip_status()
    assert not ok and "model.safetensors" in reason and "preprocessor_config.json" in reason
    assert "config.json," not in reason.split("lacks")[1].split(";")[0]


def test_optional_metrics_skip_clip_only_when_prompts_given(no_clip):
    messages = []
    x = torch.rand(2, 3, 16, 16)
    scorer = om.OptionalMetrics("edge", log=messages.append)
    assert "clip_score" not in scorer.skipped and "clip_score" not in scorer.wanted
    scorer.score(x, x)
    assert "clip_score" not in scorer.skipped and len(messages) == 1  # only FID's skip, as before
    assert scorer.score(x, x, prompts=["a", "b"]) == {} and scorer.score(x, x, prompts=["a", "b"]) == {}
    assert scorer.skipped["clip_score"].startswith("CLIPScore skipped") and len(messages) == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        om.OptionalMetrics("edge").score(x, x, prompts=["a", "b"])
    assert [str(w.message).split(":")[0] for w in caught] == ["FID (Inception) skipped", "CLIPScore skipped"]


def test_stand_in_backend_gives_expected_numbers(fake_clip):
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)])
    prompts = ["a red cube", "a blue ball", "sky", "the photo", "green"]
    assert om.clip_status() == (True, "CLIPScore: injected backend")
    assert om.clip_score(images, prompts, batch_size=2) == pytest.approx(30.0)
    assert fake_clip[-3:] == [prompts[:2], prompts[2:4], prompts[4:]]
    assert om.clip_score(images, prompts, reduction="sum") == pytest.approx(150.0)
    per = om.clip_score(images, prompts, reduction="none")
    assert per.dtype == torch.float64 and torch.allclose(per, torch.tensor([10.0, 20, 30, 40, 50], dtype=torch.float64))
    assert om.compute_optional(images, prompts, "clip_score") == pytest.approx(30.0)
    with pytest.raises(ValueError, match="one prompt per image"):
        om.clip_score(images, prompts[:2])
    with pytest.raises(ValueError, match="one prompt per image"):
        om.clip_score(images, "a red cube")
    with pytest.raises(ValueError, match="reduction"):
        om.clip_score(images, prompts, reduction="max")


def test_optional_metrics_with_prompts(fake_clip, monkeypatch):
    feats = lambda device: (lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))], 1))  # noqa: E731
    om.set_backend("fid_inception", feats)
    real = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    scorer = om.OptionalMetrics("edge")
    without = scorer.score(real, real)
    assert without.keys() == {"fid_inception"} and scorer.wanted == ["fid_inception"]
    with_prompts = scorer.score(real, real, prompts=["a"] * 4)
    assert list(with_prompts) == ["fid_inception", "clip_score"]
    assert with_prompts["fid_inception"] == pytest.approx(without["fid_inception"])
    assert with_prompts["clip_score"] == pytest.approx(100 * float(real.double().mean()))
    assert scorer.score(real, real).keys() == {"fid_inception"}  # prompts are per call
    assert scorer.skipped == {}


def test_real_tiny_clip_through_env_variable(tiny_clip_folder, no_clip, monkeypatch):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    monkeypatch.setenv(cs.CLIP_MODEL_ENV, str(tiny_clip_folder))
    ok, reason = om.clip_status()
    assert ok and str(tiny_clip_folder) in reason
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cube", "a photo of the sky", "green ball on a blue cube " * 5]  # the last one is truncated
    fn = om.load_clip()
    scores = fn(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 100).all()
    mean = om.clip_score(images, prompts, fn, batch_size=2)
    assert math.isfinite(mean) and 0 <= mean <= 100 and mean == pytest.approx(float(scores.double().mean()), abs=1e-4)
    # same numbers as the reference pipeline (processor + model), images already at the model's size
    model = CLIPModel.from_pretrained(tiny_clip_folder).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip_folder)(prompts, padding=True, truncation=True, return_tensors="pt")
    pixels = CLIPImageProcessor.from_pretrained(tiny_clip_folder)(images=list(images), do_rescale=False,
                                                                  return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    expected = 100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).clamp(min=0)
    assert torch.allclose(scores, expected, atol=1e-3)
    # other sizes are resized + centre-cropped; OptionalMetrics loads the real network once
    big = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    scorer = om.OptionalMetrics("edge", log=lambda message: None)
    value = scorer.score(big, big, prompts=["a cube", "the sky"])["clip_score"]
    assert math.isfinite(value) and 0 <= value <= 100 and scorer.skipped.keys() == {"fid_inception"}


def test_real_tiny_clip_from_local_hub_cache(tiny_clip_folder, no_clip, monkeypatch):
    helpers.make_fake_hub_cache(no_clip, cs.CLIP_MODEL, tiny_clip_folder)
    ok, reason = om.clip_status()
    assert ok and cs.CLIP_MODEL in reason and str(no_clip) in reason
    value = om.clip_score(torch.rand(2, 3, 32, 32), ["a red cube", "sky"])
    assert math.isfinite(value) and 0 <= value <= 100
