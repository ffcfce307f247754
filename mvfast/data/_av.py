"""PyAV, imported when a video is decoded or encoded rather than with the package, so that the configs,
collate, the datasets' listing and the model all work where PyAV is not installed."""

from __future__ import annotations


def require_av():
    """The ``av`` module, or an ImportError that names the missing package and how to install it."""
    try:
        import av
    except ImportError as e:
        raise ModuleNotFoundError(
            "decoding or encoding video needs PyAV (the `av` package), which is not installed "
            "(pip install av)",
            name="av",
        ) from e
    return av
