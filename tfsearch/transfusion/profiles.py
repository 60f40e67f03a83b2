"""Training profiles: every number the trainer uses, in one frozen object.

`paper` is method.md's configuration (256 px, 64 base channels, 1500 epochs). `small` is the quick profile,
what `tfsearch train` on a CPU and a run on the realistic demo without a GPU train: the same network at 128 px
with 16 base channels, trained for about 9 minutes per category on two CPU cores with AVX512-BF16 (in bf16)
and about 40 on two with AVX2 only (fp32), which finds many of the realistic demo's subtle defects
(bench/results/realistic-demo.md, "The quick profile `small`"). The demo's quick profile is not `small` but
`first`, what a bare `tfsearch run` on the demo trains without a GPU: the `cpu` network at 64 px for as many
epochs as fit a 15-minute first run on this machine (tfsearch.run.first_run), never fewer than its own,
which find every demo category's defects after per-class selection (bench/results/first-run.md). `cpu` is
the same code at toy size, 120 optimiser steps, so the whole pipeline runs in a minute and in the test
suite; it learns the demo's obvious defects only.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    # data
    image_size: int = 256
    # network (method.md §4)
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    attention: tuple[bool, ...] = (False, False, True, True)
    blocks_per_level: int = 2
    norm_groups: int = 32
    head_norm_groups: int = 8
    time_dim: int = 256
    # transparency process (method.md §2): number of β values, β_k = k / (steps - 1)
    steps: int = 20
    # optimisation (method.md §6.3)
    epochs: int = 1500
    batch_size: int = 8
    lr: float = 1e-5
    weight_decay: float = 0.01
    lr_step_epochs: int = 800
    lr_gamma: float = 0.1
    rotation_prob: float = 0.3
    rotation_degrees: float = 20.0
    focal_weight: float = 5.0
    # share of the synthetic anomalies whose appearance is the image itself, mildly changed (a colour shift or
    # a rescaled, turned copy: tfsearch.transfusion.synthesis.subtle_appearance); 0 is the paper's synthesis
    subtle_share: float = 0.0
    # largest gradient norm per optimiser step; 0 leaves gradients as they are (the paper clips none)
    grad_clip: float = 0.0
    # autocast the network to bfloat16 where the device computes it natively (`--precision auto`)
    bf16: bool = False
    seed: int = 3
    # epochs at which a checkpoint and the map cache are written; the last one is always `epochs`
    milestone_every: int = 50
    # evaluation defaults (method.md §7)
    lam: float = 0.95
    kernel: int = 7
    inference_batch: int = 16

    def __post_init__(self) -> None:
        """Every field of the type of its default (a float field takes an int), so that a profile from a
        space's `profile_overrides` or a stored job fails here, naming the field, not deep in training."""
        for field in dataclasses.fields(self):
            value, default = getattr(self, field.name), field.default
            if default is dataclasses.MISSING:  # the name
                valid = isinstance(value, str)
            elif isinstance(default, bool):
                valid = isinstance(value, bool)
            elif isinstance(default, numbers.Integral | numbers.Real):
                kind = numbers.Integral if isinstance(default, int) else numbers.Real
                valid = isinstance(value, kind) and not isinstance(value, bool)
            else:
                valid = isinstance(value, type(default))
            if not valid:
                raise ValueError(f"profile field {field.name}={value!r}: expected {type(default).__name__}")
        if self.grad_clip < 0:
            raise ValueError(f"profile field grad_clip={self.grad_clip}: expected 0 (no clipping) or more")
        if not 0 <= self.subtle_share <= 1:
            raise ValueError(f"profile field subtle_share={self.subtle_share}: expected a share from 0 to 1")

    def milestones(self, every: int | None = None) -> tuple[int, ...]:
        """Milestone epochs: every `every` epochs, always ending on the final epoch."""
        step = every or self.milestone_every
        if step <= 0:
            raise ValueError(f"milestone interval must be positive, got {step}")
        grid = list(range(step, self.epochs, step))
        return tuple(grid + [self.epochs])

    def with_epochs(self, epochs: int) -> Profile:
        """The same profile trained for `epochs`, its LR drop and milestone grid scaled in proportion."""
        scale = epochs / self.epochs
        return self.replace(
            epochs=epochs,
            lr_step_epochs=max(1, round(self.lr_step_epochs * scale)),
            milestone_every=max(1, min(epochs, round(self.milestone_every * scale))),
        )

    def replace(self, **changes: object) -> Profile:
        """A copy with some fields changed (a list, as YAML and JSON give, for a tuple field); unknown names
        are an error naming them."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown profile field(s) {unknown}; known fields: {sorted(known)}")
        changes = {name: tuple(v) if isinstance(v, list) else v for name, v in changes.items()}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> Profile:
        """The inverse of `to_dict` (JSON lists become tuples); a named built-in profile is the base."""
        base = PROFILES.get(fields.get("name", ""), cls(name="custom"))
        return base.replace(**fields)


# the paper's own configuration: jobs of this profile are checked against the paper's protocol
PAPER_PROFILE = "paper"
# profiles meant for GPUs: a run asks one GPU per trial for them by default, visible or not, so that an
# autoscaling cluster sees the demand
GPU_PROFILES = frozenset({PAPER_PROFILE})
# the profile `tfsearch train` on a CPU, and a run on the realistic demo without a GPU, fall back to when no
# profile was given
QUICK_PROFILE = "small"
# the profile a bare run on the demo trains without a GPU, its epochs fitted to this machine
# (tfsearch.run.first_run); its own epochs are the fewest that find the demo's defects
FIRST_RUN_PROFILE = "first"

# the paper's network at toy size and 120 optimiser steps: the test suite's profile
_CPU = Profile(
    name="cpu",
    image_size=64,
    base_channels=16,
    norm_groups=8,
    head_norm_groups=8,
    time_dim=64,
    steps=20,
    epochs=40,
    batch_size=16,
    lr=1e-3,
    lr_step_epochs=30,
    milestone_every=10,
    kernel=3,
    inference_batch=32,
)

PROFILES: dict[str, Profile] = {
    "paper": Profile(name="paper"),
    "cpu": _CPU,
    # the quick profile: the cpu network at the realistic demo's own 128 px, 300 optimiser steps (about 9
    # minutes per category on 2 CPU cores with AVX512-BF16, 40 with AVX2 only:
    # bench/results/realistic-demo.md)
    "small": _CPU.replace(
        name="small",
        image_size=128,
        epochs=100,
        lr=5e-4,
        lr_step_epochs=75,
        grad_clip=1.0,
        bf16=True,
        milestone_every=25,
    ),
    # the demo's first run: the cpu network, its epochs set by tfsearch.run.first_run to fit 15 minutes on
    # this machine, never fewer than these (bench/results/first-run.md)
    FIRST_RUN_PROFILE: _CPU.replace(name=FIRST_RUN_PROFILE, epochs=60, lr_step_epochs=45),
}


def get_profile(name: str, **overrides: object) -> Profile:
    """Look up a profile by name, optionally overriding fields."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    profile = PROFILES[name]
    return profile.replace(**overrides) if overrides else profile


__all__ = ["PROFILES", "Profile", "get_profile"]
