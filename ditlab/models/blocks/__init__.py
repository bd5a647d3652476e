"""Text-conditioned block kinds of the core (PixArt, SD3 MM-DiT, FLUX), registered with ``register_block`` on import."""
