"""The one exception family the tools turn into a one-line error before training starts."""

__all__ = ['PPDistillError']


class PPDistillError(ValueError):
    """A user-fixable problem (config, paths, weights, shapes); the message says what to change."""
