"""vaepar: decode and encode diffusion latents with their VAE in parallel over several workers."""

__version__ = "0.1.0"
