"""aiodelay: stop the work of an aiohttp request when its client goes away."""

__version__ = "0.1.0"
