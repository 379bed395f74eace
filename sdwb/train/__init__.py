"""Training of the builtin models (judge, VAE, UNet + text encoder)."""
