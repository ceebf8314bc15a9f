"""jointdistill: a multi-task student (segmentation + depth) distilled from two single-task teachers."""

__version__ = "0.1.0"
