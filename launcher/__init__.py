"""ftlaunch: fine-tune a model across many GPUs with Ray Train, then score it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ftlaunch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
