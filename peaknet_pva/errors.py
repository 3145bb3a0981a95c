"""One small error tree, so callers can catch everything of ours with one class."""


class PeakNetPvaError(Exception):
    """Base class of every error raised by peaknet_pva."""


class ConfigError(PeakNetPvaError, ValueError):
    """A parameter, preset or config file is invalid; the message names the key."""


class CheckpointError(PeakNetPvaError):
    """A checkpoint is missing, unreadable, or does not match the model."""


class FrameError(PeakNetPvaError, ValueError):
    """A detector frame has the wrong rank, shape, dtype or contents."""
