"""vaepar: decode and encode diffusion latents with their VAE in parallel over several workers.

From Python, inside your own torchrun job or diffusers pipeline::

    import vaepar
    vaepar.parallelize(pipe.vae)       # pipe.vae.decode / encode now run across the ranks
    vaepar.unparallelize(pipe.vae)     # and back

See :func:`vaepar.parallelize`. The command line is ``vaepar`` (``python -m vaepar``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaepar.errors import OptionError, VaeparError

if TYPE_CHECKING:
    from vaepar.api import parallelize, unparallelize

__version__ = "0.1.0"
__all__ = ["OptionError", "VaeparError", "__version__", "parallelize", "unparallelize"]


def __getattr__(name: str) -> Any:
    """Import torch and diffusers only when the API is used (the CLI sets their environment first)."""
    if name in ("parallelize", "unparallelize"):
        from vaepar import api

        return getattr(api, name)
    raise AttributeError(f"module 'vaepar' has no attribute {name!r}")
