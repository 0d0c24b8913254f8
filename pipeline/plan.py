"""The shard plan: a pure function of the run config, shard -> sample indices -> seeds -> conditions.

Because the plan depends on nothing but the config, any worker can (re)generate any shard at any
time and produce the same bytes: at-least-once execution yields exactly-once data.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage_schemas import shard_id as format_shard_id
from storage_schemas._fields import hash64, seed63


def sample_seed(base_seed: int, index: int) -> int:
    """Noise seed of sample ``index``: a 63-bit hash of (base_seed, index), unique in practice."""
    return seed63("trajflow-seed", base_seed, index)


def sample_guidance(guidance: float | tuple[float, float], base_seed: int, index: int) -> float:
    """Fixed guidance, or a per-sample draw from the [min, max] range (rounded to 1e-6 so the
    value written into JSON is the value the solver used)."""
    if isinstance(guidance, (int, float)):
        return float(guidance)
    lo, hi = guidance
    u = hash64("trajflow-guidance", base_seed, index) / 2**64
    return round(lo + (hi - lo) * u, 6)


@dataclass(frozen=True)
class SampleSpec:
    index: int
    seed: int
    guidance: float
    class_id: int | None = None
    prompt_id: str | int | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class ShardPlan:
    """Splits ``num_trajectories`` samples into shards of ``shard_size`` contiguous indices."""

    num_trajectories: int
    shard_size: int
    base_seed: int
    guidance: float | tuple[float, float] = 1.0
    #: class ids cycled over sample indices (round-robin keeps classes balanced); None: no classes
    classes: tuple[int, ...] | None = None
    #: (prompt_id, prompt) pairs cycled over sample indices; None: no prompts
    prompts: tuple[tuple[str | int, str], ...] | None = None

    @property
    def num_shards(self) -> int:
        return -(-self.num_trajectories // self.shard_size)

    def shard_id(self, number: int) -> str:
        return format_shard_id(number)

    def shard_indices(self, number: int) -> range:
        if not 0 <= number < self.num_shards:
            raise IndexError(f"shard {number} is outside the plan's {self.num_shards} shards")
        start = number * self.shard_size
        return range(start, min(start + self.shard_size, self.num_trajectories))

    def sample(self, index: int) -> SampleSpec:
        class_id = None if self.classes is None else self.classes[index % len(self.classes)]
        prompt_id = prompt = None
        if self.prompts is not None:
            prompt_id, prompt = self.prompts[index % len(self.prompts)]
        return SampleSpec(index, sample_seed(self.base_seed, index),
                          sample_guidance(self.guidance, self.base_seed, index), class_id, prompt_id, prompt)

    def shard_samples(self, number: int) -> list[SampleSpec]:
        return [self.sample(i) for i in self.shard_indices(number)]
