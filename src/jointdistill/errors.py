"""The errors a user can cause. Each carries one message that names what is wrong and where."""


class JointDistillError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(JointDistillError):
    """A params file or override is unknown, mistyped or out of range."""


class DataError(JointDistillError):
    """An input sample or source is unusable (missing, corrupt, inconsistent)."""


class ModelError(JointDistillError):
    """A model, checkpoint or weights file is unusable or does not fit the configured architecture."""


class OutputError(JointDistillError):
    """An output location cannot be written."""
