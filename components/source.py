"""KFP component for the pipeline's first step: the data source, pinned to a version of a DVC project.

With ``repo`` empty the pipeline uses the embedded synthetic generator (the default) and this step only
records that; otherwise it fetches ``path`` of the DVC project ``repo`` at ``rev`` from the project's remote
with DVC's API, checks every file against the md5 the project records there, and hands the folder on as a
``Dataset`` whose metadata (``lineage.data``) names repo, revision, commit and md5. A bad pin fails here, before
any training.
"""

from kfp import dsl
from kfp.dsl import Dataset, Output


def source(repo: str, rev: str, path: str, data: Output[Dataset]):
    """Fetch the pinned dataset version (or mark the embedded synthetic source) into ``data``."""
    import json
    import os

    from jointdistill.cloud import pinned
    from jointdistill.errors import DataError

    if not repo:
        os.makedirs(data.path, exist_ok=True)
        with open(os.path.join(data.path, "SOURCE.json"), "w") as f:
            json.dump({"kind": "synthetic"}, f)
        data.metadata["lineage"] = {"data": {"kind": "synthetic"}}
        return
    if not rev or not path:
        raise DataError(f"data source {repo!r}: give both data_rev (tag, branch or commit) and data_path")
    record = pinned.fetch(repo, rev, path, data.path)
    data.metadata["lineage"] = {"data": {"kind": "dvc", **record}}


def component(image: str):
    return dsl.component(source, base_image=image, install_kfp_package=False)
