"""The package's version, in a module of its own so that any module can read it without importing the package's
front door (which names every public function)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("layercrit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
