"""hshelper: root-only build steps in a tiny helper VM assembled from the build root."""

__version__ = "0.1.0"
