"""KFP component for the `prepare` stage: the typed-artifact adapter around jointdistill.stages.prepare."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output


def prepare(params: dict, source: Input[Dataset], prepared: Output[Dataset]):
    """Build the prepared dataset from the source step's data into the output artifact's directory."""
    # Runs inside the project image: everything is already installed there.
    from jointdistill.config import params_from_dict
    from jointdistill.stages import prepare as stage
    from jointdistill.stages.results import record_artifact

    data = (source.metadata.get("lineage") or {}).get("data")
    result = stage.run_from_source(
        params_from_dict(params, "pipeline parameter 'params'"), source.path, data, prepared.path
    )
    record_artifact(prepared, result)


def component(image: str):
    """The component, bound to ``image``; nothing is pip-installed at run time."""
    return dsl.component(prepare, base_image=image, install_kfp_package=False)
