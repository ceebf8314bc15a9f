"""The Kubeflow pipeline: definition, compilation and local execution."""
