"""The embedded synthetic street scenes as a `Source`."""

from __future__ import annotations

from jointdistill.config import PrepareParams
from jointdistill.data.sample import Sample, SampleRef
from jointdistill.data.sources.registry import register
from jointdistill.data.sources.street_scenes import CLASSES, GENERATOR_VERSION, PALETTE, SyntheticScenes
from jointdistill.data.split import hash_fraction


@register("synthetic")
class SyntheticSource:
    name = "synthetic"
    classes = CLASSES
    palette = PALETTE
    ignore_index = 255

    def __init__(self, params: PrepareParams, seed: int):
        # The world (frames, test split) is prepare.world_seed's; the run's seed only draws val and the budget, so
        # every seed of an ablation is scored on the same test frames.
        del seed
        self.params = params
        self.seed = seed = params.world_seed
        self.scenes = SyntheticScenes(params.height, params.width, seed=seed, max_depth=params.max_depth)

    @staticmethod
    def sample_id(index: int) -> str:
        return f"synthetic-{index:06d}"

    def list(self) -> list[SampleRef]:
        refs = []
        for index in range(self.params.num_samples):
            sid = self.sample_id(index)
            # The source's own test split, decided per id so that more samples never move old ones.
            split = "test" if hash_fraction(sid, self.seed, "synthetic-test") < self.params.test_fraction else "train"
            refs.append(SampleRef(sid, split, (f"synthetic://seed={self.seed}/index={index}",)))
        return refs

    def load(self, ref: SampleRef) -> Sample:
        index = int(ref.sample_id.rsplit("-", 1)[1])
        image, label, depth = self.scenes.render(index)
        return Sample(ref.sample_id, image, label, depth)

    def describe(self) -> dict:
        return {
            "generator": "jointdistill.data.sources.street_scenes",
            "generator_version": GENERATOR_VERSION,
            "seed": self.seed,
            "num_samples": self.params.num_samples,
        }
