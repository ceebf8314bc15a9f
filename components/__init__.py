"""KFP components: one per pipeline step, each a thin wrapper around jointdistill.stages."""
