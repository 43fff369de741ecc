"""The platform as users start it (`resultity up`), shared by this folder's tests."""

from tests.running_platform import platform  # noqa: F401 - a fixture, used by name
