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


def brief(text: object, limit: int = 300) -> str:
    """Another library's error text, shortened for one of ours without cutting a sentence: its first line, and
    when that is longer than ``limit``, its first sentences (or words) up to it, marked with "…"."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    if len(line) <= limit:
        return line
    cut = line[:limit]
    end = max(cut.rfind(". "), cut.rfind("; "))
    if end >= limit // 4:
        return cut[: end + 1] + " …"
    return cut[: cut.rfind(" ")].rstrip(",;:") + " …" if " " in cut else cut + "…"
