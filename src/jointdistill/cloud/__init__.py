"""Where the pipeline meets remote systems: GCS publishing and fetching, gs:// staging for Kubeflow, Kubeflow
Trainer jobs, pinned DVC data, and Kubeflow results pulled back into DVC."""
