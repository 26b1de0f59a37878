"""Command lines made from config dataclasses (tools/worldbuild/cli.py) and the scripts that use them."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

import pretrain_teacher
from worldbuild.cli import config_from_args, parser_from_dataclass


@dataclass
class _Config:
    steps: int = 3
    lr: float = 1e-3
    name: str = "run"
    widths: tuple[int, int, int] = (4, 8, 16)
    augment: bool = True
    strict: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")

    @classmethod
    def smoke(cls, **overrides) -> "_Config":
        return cls(**{"steps": 1, "name": "smoke", **overrides})


def _parse(argv, factory=None):
    parser = parser_from_dataclass(_Config, "test", helps={"steps": "optimizer steps"}, skip=("extra",))
    return config_from_args(_Config, parser.parse_args(argv), parser, factory)


def test_flags_cover_every_field_type_and_only_given_flags_override():
    assert _parse([]) == _Config()
    cfg = _parse(["--steps", "7", "--lr", "0.5", "--name", "x", "--widths", "1,2,3", "--augment", "false",
                  "--strict"])
    assert cfg == _Config(steps=7, lr=0.5, name="x", widths=(1, 2, 3), augment=False, strict=True)
    # a factory (a smoke preset) supplies its own values where no flag is given
    assert _parse(["--steps", "5"], _Config.smoke) == _Config(steps=5, name="smoke")
    help_text = parser_from_dataclass(_Config, "test", helps={"steps": "optimizer steps"},
                                      skip=("extra",)).format_help()
    assert "optimizer steps (default 3)" in help_text and "--extra" not in help_text


def test_bad_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as err:
        _parse(["--steps", "0"])
    assert err.value.code == 2 and "steps must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--widths", "1,x"])
    with pytest.raises(TypeError, match="extra"):
        parser_from_dataclass(_Config, "test")  # a dict field needs a flag of the script's own
    with pytest.raises(ValueError, match="no field"):
        parser_from_dataclass(_Config, "test", skip=("nope",))


def test_pretrain_teacher_keeps_its_flags():
    flags = {s for a in pretrain_teacher.build_parser()._actions for s in a.option_strings}
    assert flags - {"-h", "--help"} == {
        "--batch-size", "--caption-dropout", "--cross-attention-everywhere", "--ema-decay", "--init-from",
        "--kl-weight", "--log-every", "--lr", "--num-scenes", "--output-dir", "--seed", "--snr-gamma",
        "--text-layers", "--threads", "--time-budget-min", "--unet-channels", "--unet-steps", "--vae-batch-size",
        "--vae-crop", "--vae-full-res-fraction", "--vae-lr", "--vae-steps", "--workers"}
    cfg = pretrain_teacher.parse_args(["--unet-channels", "16,32,32", "--text-layers", "2", "--vae-steps", "5"])
    assert cfg.architecture.unet_channels == (16, 32, 32) and cfg.architecture.text_layers == 2
    assert cfg.architecture.unet_cross_attention == (False, True, True)
    assert cfg.vae_steps == 5 and cfg.unet_steps == 2600 and cfg.workers == 2
    assert not cfg.cross_attention_everywhere and cfg.output_dir == "condistill/assets/tiny-teacher"
