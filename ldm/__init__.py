"""ldm: latent diffusion on Lightning + Hydra."""

__version__ = "0.1.0"
