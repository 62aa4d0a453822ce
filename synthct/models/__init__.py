"""Models: autoencoder, diffusion UNet, schedulers, plugins."""
