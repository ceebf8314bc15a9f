"""KFP component for the `prepare` stage: the typed-artifact adapter around jointdistill.stages.prepare."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output


def prepare(params: dict, source: Input[Dataset], prepared: Output[Dataset]):
    """Build the prepared dataset from the source step's data into the output artifact's directory."""
    # Runs inside the project image: everything is already installed there.
    from jointdistill import lineage
    from jointdistill.config import params_from_dict
    from jointdistill.stages import prepare as stage

    data = (source.metadata.get("lineage") or {}).get("data")
    meta = stage.run_from_source(
        params_from_dict(params, "pipeline parameter 'params'"), source.path, data, prepared.path
    )
    prepared.metadata["lineage"] = lineage.read(prepared.path)
    prepared.metadata["source_commit"] = lineage.source_commit() or ""
    prepared.metadata.update(
        {
            "dataset": meta["dataset"],
            "counts": meta["counts"],
            "resolution": meta["resolution"],
            "source_checksum": meta["source_checksum"],
            "params_digest": meta["params_digest"],
        }
    )


def component(image: str):
    """The component, bound to ``image``; nothing is pip-installed at run time."""
    return dsl.component(prepare, base_image=image, install_kfp_package=False)
