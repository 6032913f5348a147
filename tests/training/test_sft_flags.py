"""Run settings are declared once: the `rmoe finetune` and `rmoe continual run` flags come from
the SFTConfig / ContinualConfig fields (rmoe.training.sft.Flag), and parse back into them."""

from __future__ import annotations

import dataclasses

import pytest

from rmoe.cli.finetune import settings_from_args
from rmoe.cli.main import build_parser
from rmoe.continual.harness import ContinualConfig
from rmoe.training.sft import SFTConfig

LIBRARY_ONLY = {"generate", "log_every"}
"""SFTConfig fields without a flag (set them from Python)."""

REQUIRED = ["finetune", "m", "--data", "d.jsonl", "--out", "o"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse(argv):
    return build_parser().parse_args(argv)


def test_every_sft_field_is_a_finetune_flag_or_declared_library_only():
    parser_flags = set()
    for action in build_parser()._subparsers._group_actions[0].choices["finetune"]._actions:
        parser_flags.update(action.option_strings)
    for f in dataclasses.fields(SFTConfig):
        has_flag = f.metadata.get("flag") is not None
        assert has_flag != (f.name in LIBRARY_ONLY), f.name
        assert (_flag(f.name) in parser_flags) == has_flag, f.name


def test_finetune_defaults_are_the_dataclass_defaults():
    args = _parse(REQUIRED)
    assert SFTConfig(**settings_from_args(args, SFTConfig)) == SFTConfig()


def _other_value(f: dataclasses.Field):
    """A command-line value different from the field's default, and what it parses to."""
    meta = f.metadata["flag"]
    if meta.choices:
        value = next(c for c in meta.choices if c != f.default)
        return [value], value
    if f.default is False:
        return [], True
    if f.name == "mask_targets":
        return ["*.a,*.b"], ["*.a", "*.b"]
    if isinstance(f.default, str):
        return ["cpu"], "cpu"
    if f.name in ("gw_threshold", "migu_ratio", "random_mask_ratio", "epochs"):
        return ["0.25"], 0.25
    return ["7"], 7


@pytest.mark.parametrize(
    "field", [f for f in dataclasses.fields(SFTConfig) if f.name not in LIBRARY_ONLY], ids=str
)
def test_each_finetune_flag_sets_its_field(field):
    words, value = _other_value(field)
    cfg = SFTConfig(**settings_from_args(_parse([*REQUIRED, _flag(field.name), *words]), SFTConfig))
    assert getattr(cfg, field.name) == value
    assert dataclasses.replace(cfg, **{field.name: field.default}) == SFTConfig()


def test_continual_run_maps_its_flags_onto_both_configs():
    args = _parse(["continual", "run", "--model", "m", "--out", "o"])
    sft = SFTConfig(**settings_from_args(args, SFTConfig))
    cfg = ContinualConfig(sft=sft, **settings_from_args(args, ContinualConfig))
    # the command's own defaults (unchanged from before the flags were generated)
    assert (sft.steps, sft.batch_size, sft.max_len) == (150, 32, 128)
    assert dataclasses.replace(sft, steps=0, batch_size=16, max_len=256) == SFTConfig()
    assert cfg == ContinualConfig(sft=sft)
    argv = ["continual", "run", "--model", "m", "--out", "o", "--steps-per-task", "3",
            "--migu-ratio", "0.5", "--metric", "tf_exact_match", "--mask-first-task",
            "--mask-targets", "*.experts.*", "--seed", "4", "--device", "cpu"]  # fmt: skip
    args = _parse(argv)
    sft = SFTConfig(**settings_from_args(args, SFTConfig))
    cfg = ContinualConfig(sft=sft, **settings_from_args(args, ContinualConfig))
    assert (sft.steps, sft.seed, sft.device, sft.mask_targets) == (3, 4, "cpu", ["*.experts.*"])
    assert (cfg.migu_ratio, cfg.metric, cfg.mask_first_task) == (0.5, "tf_exact_match", True)


def test_a_field_without_a_flag_is_refused():
    import argparse

    from rmoe.cli.finetune import add_setting

    with pytest.raises(ValueError, match="not a command-line setting"):
        add_setting(argparse.ArgumentParser(), SFTConfig, "log_every")
