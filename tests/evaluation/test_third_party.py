"""Optional LPIPS / Inception-FID metrics: the skip path (weights absent) and, with injected tiny
backends, the computation and its integration into the evaluation report."""
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from condistill.evaluation import backends
from condistill.evaluation import third_party as om
from condistill.evaluation.evaluate import RowSpec, evaluate, markdown_table
import helpers
from helpers import make_tiny_base

torch_single_thread = helpers.torch_single_thread  # module-scoped autouse fixture: one CPU thread


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("optional"))


@pytest.fixture
def empty_hub(monkeypatch, tmp_path):
    """An empty torch hub folder and no injected backend: nothing optional is available."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(backends, "BACKENDS", {})
    return hub


@pytest.fixture
def fake_backends(monkeypatch):
    """Tiny deterministic stand-ins for the LPIPS and Inception networks, recording their inputs."""
    calls = {"lpips": [], "fid": []}
    weight = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))

    def lpips_factory(device):
        def distance(a, b):
            calls["lpips"].append(a.clone())
            fa, fb = F.conv2d(a, weight, padding=1), F.conv2d(b, weight, padding=1)
            return (fa - fb).pow(2).mean((1, 2, 3))
        return distance

    def fid_factory(device):
        def features(x):
            calls["fid"].append(x.shape[0])
            return torch.cat([F.adaptive_avg_pool2d(x, 2).flatten(1), x.std((2, 3))], 1)
        return features

    monkeypatch.setattr(backends, "BACKENDS", {})
    om.set_backend("lpips", lpips_factory)
    om.set_backend("fid_inception", fid_factory)
    return calls


def test_skip_reasons_name_the_missing_files(empty_hub):
    ok, reason = om.lpips_status()
    assert not ok and reason.startswith("LPIPS skipped")
    assert str(empty_hub / "checkpoints" / "alexnet-owt-7be5be79.pth") in reason
    ok, reason = om.fid_status()
    assert not ok and reason.startswith("FID (Inception) skipped")
    assert str(empty_hub / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth") in reason
    x = torch.rand(2, 3, 16, 16)
    assert om.compute_optional(x, x, "lpips") is None and om.compute_optional(x, x, "fid_inception") is None
    with pytest.raises(RuntimeError, match="LPIPS skipped"):
        om.load_lpips()
    with pytest.raises(ValueError, match="unknown optional metric"):
        om.compute_optional(x, x, "kid")


def test_availability_rule_needs_package_and_weights(empty_hub, tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "weights" / "v0.1" / "alex.pth").write_bytes(b"x")
    fake = {"lpips": types.SimpleNamespace(__file__=str(pkg / "__init__.py")), "pytorch_fid": types.SimpleNamespace()}
    monkeypatch.setattr(backends, "try_import", lambda name: fake.get(name))
    ok, reason = om.lpips_status()
    assert not ok and "not installed" not in reason and "alexnet-owt-7be5be79.pth not found" in reason
    ok, reason = om.fid_status()
    assert not ok and "not installed" not in reason and "pt_inception-2015-12-05-6726825d.pth not found" in reason
    (empty_hub / "checkpoints").mkdir()
    (empty_hub / "checkpoints" / om.LPIPS_WEIGHTS).write_bytes(b"x")
    (empty_hub / "checkpoints" / om.FID_WEIGHTS).write_bytes(b"x")
    assert om.lpips_status()[0] and om.fid_status()[0]
    # weights present but no package: still unavailable, and the reason says which package to install
    monkeypatch.setattr(backends, "try_import", lambda name: None)
    ok, reason = om.lpips_status()
    assert not ok and "pip install lpips" in reason and om.LPIPS_WEIGHTS not in reason
    ok, reason = om.fid_status()
    assert not ok and "pip install pytorch-fid" in reason and "not found" not in reason


def test_no_downloads_guard(tmp_path):
    original = torch.hub.download_url_to_file
    with om.no_downloads():
        with pytest.raises(RuntimeError, match="never download"):
            torch.hub.load_state_dict_from_url("https://example.invalid/weights.pth", model_dir=str(tmp_path))
    assert torch.hub.download_url_to_file is original
    assert not list(tmp_path.iterdir())


def test_values_with_injected_backends(fake_backends):
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 3, 16, 16, generator=g), torch.rand(16, 3, 16, 16, generator=g)
    assert om.lpips_distance(x, x) == 0.0
    d = om.lpips_distance(x, y, batch_size=5)
    assert d > 0
    # inputs went to the network in [-1, 1], up-sampled to the minimum LPIPS size, all pairs counted
    seen = torch.cat(fake_backends["lpips"][1:])
    assert seen.shape == (16, 3, om.LPIPS_MIN_SIZE, om.LPIPS_MIN_SIZE)
    assert seen.min() < -0.5 and seen.max() <= 1.0
    assert om.compute_optional(x, y, "lpips") == pytest.approx(d)
    assert om.fid_inception(x, x) == pytest.approx(0.0, abs=1e-6)
    assert om.fid_inception(x, 0.5 * y) > 0.05
    assert om.compute_optional(x, 0.5 * y, "fid_inception") == pytest.approx(om.fid_inception(x, 0.5 * y))


def test_optional_metrics_per_condition_and_caching(fake_backends):
    real = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    scorer = om.OptionalMetrics("sr")
    assert scorer.skipped == {}
    first, second = scorer.score(real, real), scorer.score(real.flip(-1), real)
    assert first["lpips"] == 0.0 and first["fid_inception"] == pytest.approx(0.0, abs=1e-6)
    assert second["lpips"] > 0
    assert fake_backends["fid"] == [6, 6, 6]  # the real images' features are computed once
    assert om.OptionalMetrics("edge").score(real, real).keys() == {"fid_inception"}


def test_failing_backend_is_skipped_with_reason(fake_backends):
    def broken(device):
        raise OSError("corrupt weights file")

    om.set_backend("fid_inception", broken)
    messages = []
    scorer = om.OptionalMetrics("inpaint", log=messages.append)
    x = torch.rand(2, 3, 16, 16)
    assert scorer.score(x, x).keys() == {"lpips"} and scorer.score(x, x).keys() == {"lpips"}
    assert "corrupt weights file" in scorer.skipped["fid_inception"] and len(messages) == 1


def test_default_logging_warns_once_per_metric(empty_hub):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer = om.OptionalMetrics("sr")
        scorer.score(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    texts = [str(w.message) for w in caught]
    assert len(texts) == 2 and texts[0].startswith("LPIPS skipped") and texts[1].startswith("FID (Inception) skipped")


def test_evaluate_records_skipped_metrics(tiny_base, empty_hub, tmp_path):
    messages = []
    report = evaluate("sr", [RowSpec("bicubic", "bicubic", "none", 0, 0.0)], base=str(tiny_base), num_images=2,
                      batch_size=2, out_dir=tmp_path / "out", log=messages.append)
    skipped = report["skipped_metrics"]
    assert set(skipped) == {"lpips", "fid_inception"} and messages == [skipped["lpips"], skipped["fid_inception"]]
    assert om.LPIPS_WEIGHTS in skipped["lpips"] and om.FID_WEIGHTS in skipped["fid_inception"]
    assert not {"lpips", "fid_inception"} & report["rows"][0]["metrics"].keys()
    text = (tmp_path / "out" / "results.md").read_text()
    table, note = text.split("\n\n")
    assert "lpips" not in table and "fid_inception" not in table
    assert note.startswith("Skipped metrics: lpips (LPIPS skipped") and om.FID_WEIGHTS in note


def test_evaluate_adds_columns_when_available(tiny_base, fake_backends, tmp_path):
    report = evaluate("sr", [RowSpec("bicubic", "bicubic", "none", 0, 0.0)], base=str(tiny_base), num_images=4,
                      batch_size=2, out_dir=tmp_path / "out")
    assert report["skipped_metrics"] == {}
    m = report["rows"][0]["metrics"]
    assert m["lpips"] > 0 and m["fid_inception"] >= 0
    table = markdown_table(report)
    assert "lpips (lower)" in table and "fid_inception (lower)" in table
    assert f"{m['lpips']:.3f}" in table
    assert "Skipped" not in (tmp_path / "out" / "results.md").read_text()


def test_skip_reasons_name_the_home_folder_as_a_tilde(empty_hub, monkeypatch):
    """A committed results.json must not carry the home folder of the machine that wrote it."""
    monkeypatch.setenv("HOME", str(empty_hub.parent))
    monkeypatch.setattr(backends, "try_import", lambda name: None)
    for status in (om.lpips_status, om.fid_status):
        ok, reason = status()
        assert not ok and str(empty_hub.parent) not in reason
        assert f"~/{empty_hub.name}/checkpoints/" in reason
    outside = empty_hub.parent.parent / "elsewhere" / "w.pth"
    monkeypatch.setenv("HOME", str(empty_hub))
    assert om.shown_path(outside) == str(outside)
