"""From a spec to concrete runs: one `ArmRun` per (arm, depth, seed), each with its resolved
TrainConfig, and the FLOP-matched step counts.

Budget matching. Every arm trains on the same tokens per step. `match: tokens` arms run the base
`train.max_steps`. A `match: flops` arm runs

    steps = round(ref_steps * ref_flops_per_token * ref_tokens_per_step
                  / (flops_per_token * tokens_per_step))

so that steps x FLOPs/token x tokens/step equals the reference arm's (the spec's
`budget.flops_reference`, at the same depth and seed). FLOPs/token come from
`rmoe.modeling.accounting.count_config` (forward matmul FLOPs, router included; training costs
~3x forward for every arm, so the ratio is the same).

An arm with `init_from` (see `rmoe.experiments.spec`) takes its model section and depth from
the checkpoint (`checkpoint_model`), and its FLOPs count the continued training only: the
pre-training that made the checkpoint is not part of any arm's budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..loading import checkpoint_model
from ..modeling.accounting import ModelCounts, count_config
from ..training.config import TrainConfig, set_key
from .spec import CHECKPOINT_ROUTER, ROUTER_VARIANTS, ArmSpec, ExperimentSpec


@dataclass
class ArmRun:
    """One training run of the grid.

    Attributes:
        run_id: unique directory name, `{arm}-L{depth}-s{seed}`.
        arm: the arm's name.
        label: display name.
        router: the router variant.
        depth: number of layers.
        seed: train.seed (data order and non-router init).
        config: the resolved TrainConfig (max_steps already budget-matched).
        counts: parameter and FLOP counts of the model.
        match: `tokens` or `flops`.
        preset: the model keys the router variant sets (`ROUTER_VARIANTS[router]`).
        settings: the arm's own `set:` overrides (`section.key` -> value), applied after the
            preset, so they win (a sweep setting's keys included).
        family: the arm's name before the sweep (= arm without a sweep).
        setting: the sweep setting ("" without a sweep).
        init_from: the checkpoint the run continues training (as written in the spec; None =
            a fresh model). `summary()` names it only when set.
    """

    run_id: str
    arm: str
    label: str
    router: str
    depth: int
    seed: int
    config: TrainConfig
    counts: ModelCounts
    match: str
    preset: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    family: str = ""
    setting: str = ""
    init_from: str | None = None

    def __post_init__(self) -> None:
        if not self.family:
            self.family = self.arm

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step (global batch x seq_len)."""
        return self.config.data.batch_size * self.config.data.seq_len

    @property
    def train_flops(self) -> float:
        """Total training FLOPs, 3 x forward FLOPs/token x tokens (matmuls only)."""
        return 3.0 * self.counts.forward_flops_per_token * self.tokens_per_step * self.max_steps

    @property
    def settings_text(self) -> str:
        """The arm's `set:` overrides as ``key=value, ...`` ("" when none)."""
        return format_settings(self.settings)

    @property
    def max_steps(self) -> int:
        """Optimizer steps of this run."""
        return self.config.train.max_steps

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the run (no config); `init_from` only when set."""
        out = {
            "run_id": self.run_id,
            "arm": self.arm,
            "family": self.family,
            "setting": self.setting,
            "label": self.label,
            "router": self.router,
            "depth": self.depth,
            "seed": self.seed,
            "match": self.match,
            "preset": dict(self.preset),
            "settings": dict(self.settings),
            "max_steps": self.max_steps,
            "tokens_per_step": self.tokens_per_step,
            "total_params": self.counts.total_params,
            "active_params": self.counts.active_params,
            "router_params": self.counts.router_params,
            "flops_per_token": self.counts.forward_flops_per_token,
            "router_flops_per_token": self.counts.router_flops_per_token,
            "train_flops": self.train_flops,
        }
        if self.init_from is not None:
            out["init_from"] = self.init_from
        return out


def format_value(value: Any) -> str:
    """A setting's value as it would be written in YAML (true, null, 0.0001, sigmoid)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_settings(settings: dict[str, Any]) -> str:
    """``key=value, ...`` of `settings` in their order ("" when empty)."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in settings.items())


def format_plan(runs: list[ArmRun]) -> list[str]:
    """One line per run: id, router variant, steps, tokens, FLOPs and the arm's `set:` keys."""
    lines = []
    for r in runs:
        line = (
            f"{r.run_id:28s} {r.router:19s} steps {r.max_steps:6d}  "
            f"tokens {r.max_steps * r.tokens_per_step:>12,d}  "
            f"FLOPs/token {r.counts.forward_flops_per_token:>12,d}  "
            f"train FLOPs {r.train_flops:.3e}"
        )
        lines.append(line + (f"  set: {r.settings_text}" if r.settings else ""))
    return lines


def vocab_size_of(tokenizer: str) -> int:
    """Vocabulary size a tokenizer spec gives (`bpe:N` -> N; files and `bytes` are loaded)."""
    if tokenizer.startswith("bpe:"):
        return int(tokenizer.split(":", 1)[1])
    from ..data import build_tokenizer

    return build_tokenizer(tokenizer).vocab_size


def _check_router(arm: ArmSpec, model: dict[str, Any]) -> None:
    """An init_from arm's `router:` (when named) must be the checkpoint's (ValueError)."""
    if arm.router == CHECKPOINT_ROUTER:
        return
    wrong = {k: v for k, v in ROUTER_VARIANTS[arm.router].items() if model.get(k) != v}
    if wrong:
        key = next(iter(wrong))
        raise ValueError(
            f"arm {arm.name!r}: router: {arm.router} but the checkpoint {arm.init_from!r} has "
            f"{key}={model.get(key)!r} (the variant sets {key}={wrong[key]!r}); an init_from arm "
            "keeps its checkpoint's router: retrofit one with `rmoe import --router recurrent` "
            "and point the arm there, or drop `router:`"
        )


def arm_config(
    spec: ExperimentSpec, arm: ArmSpec, depth: int, seed: int, base: TrainConfig | None = None
) -> TrainConfig:
    """The TrainConfig of one (arm, depth, seed) before budget matching. An `init_from` arm's
    model section is its checkpoint's (`checkpoint_model`; `depth` must be the checkpoint's)."""
    cfg = copy.deepcopy(base if base is not None else spec.base_config())
    if arm.init_from:
        model, _ = checkpoint_model(arm.init_from)
        _check_router(arm, model)
        if int(model.get("num_hidden_layers", depth)) != int(depth):
            raise ValueError(
                f"arm {arm.name!r}: depth {depth} but its checkpoint {arm.init_from!r} has "
                f"{model.get('num_hidden_layers')} layers; drop `depths` from an init_from arm"
            )
        cfg.model = model
    else:
        for key, value in ROUTER_VARIANTS[arm.router].items():
            cfg.model[key] = value
    cfg.model["num_hidden_layers"] = int(depth)
    for key, value in arm.set.items():
        set_key(cfg, key, value)
    cfg.train.seed = int(seed)
    # an arm's budget is its planned step count (FLOP/token matched), never the machine's speed:
    # a preset's time budget (the demo's) does not apply to experiments
    cfg.train.time_budget_s = 0.0
    # eager unless a spec asks for compile: the same code path on every machine (and the
    # committed results' configs, written before `auto` existed, still match)
    if cfg.train.compile == "auto":
        cfg.train.compile = False
    if spec.time_limit_s:
        cfg.train.time_limit_s = float(spec.time_limit_s)
    cfg.validate()
    return cfg


def matched_steps(
    ref_steps: int,
    ref_flops_per_token: float,
    flops_per_token: float,
    ref_tokens_per_step: int = 1,
    tokens_per_step: int = 1,
) -> int:
    """Steps that give an arm the reference arm's training FLOPs (at least 1).

    steps x flops_per_token x tokens_per_step = ref_steps x ref_flops_per_token x
    ref_tokens_per_step, rounded to the nearest step.
    """
    if flops_per_token <= 0 or tokens_per_step <= 0:
        raise ValueError("flops_per_token and tokens_per_step must be > 0")
    budget = ref_steps * ref_flops_per_token * ref_tokens_per_step
    return max(1, int(round(budget / (flops_per_token * tokens_per_step))))


def plan_runs(spec: ExperimentSpec, only: list[str] | None = None) -> list[ArmRun]:
    """Expand the spec into runs (arm x depth x seed), FLOP-matched where asked.

    Args:
        spec: the experiment.
        only: restrict to these arm names or families (the FLOP reference is still planned
            internally to size matched arms, but not returned unless listed).
    """
    base = spec.base_config()
    default_depths = spec.depths or [int(base.model.get("num_hidden_layers", 4))]
    if only:
        families = spec.families()
        for name in only:
            if name not in families:
                spec.arm(name)  # raises with the list of arms
    vocab = vocab_size_of(base.data.tokenizer)

    def build(arm: ArmSpec, depth: int, seed: int) -> ArmRun:
        cfg = arm_config(spec, arm, depth, seed, base)
        arm_vocab = checkpoint_model(arm.init_from)[1] if arm.init_from else vocab
        counts = count_config(cfg.model_config(vocab_size=arm_vocab), cfg.data.seq_len)
        return ArmRun(
            run_id=f"{arm.name}-L{depth}-s{seed}",
            arm=arm.name,
            label=arm.label or arm.name,
            router=arm.router,
            depth=int(depth),
            seed=int(seed),
            config=cfg,
            counts=counts,
            match=arm.match,
            preset={} if arm.init_from else dict(ROUTER_VARIANTS[arm.router]),
            settings=dict(arm.set),
            family=arm.family,
            setting=arm.setting,
            init_from=arm.init_from,
        )

    def depths_of(arm: ArmSpec) -> list[int]:
        if arm.init_from:  # the checkpoint's depth
            return [int(checkpoint_model(arm.init_from)[0].get("num_hidden_layers", 4))]
        return arm.depths or default_depths

    runs: list[ArmRun] = []
    for arm in spec.arms:
        for depth in depths_of(arm):
            for seed in arm.seeds or spec.seeds:
                run = build(arm, depth, seed)
                if arm.match == "flops":
                    ref_arm = spec.arm_for(spec.flops_reference or "", arm.setting)
                    ref = build(ref_arm, depth, seed)
                    run.config.train.max_steps = matched_steps(
                        ref.max_steps,
                        ref.counts.forward_flops_per_token,
                        run.counts.forward_flops_per_token,
                        ref.tokens_per_step,
                        run.tokens_per_step,
                    )
                runs.append(run)
    if only:
        runs = [r for r in runs if r.arm in only or r.family in only]
    return runs
