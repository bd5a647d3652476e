"""Sampling-time methods: each wraps a trained network as the model function the sampler calls.

- ``caches``: training-free feature caches (FORA, Delta-DiT, TeaCache, TaylorSeer, MagCache, ToCa) and the static
  plans learned routers export;
- ``cache_router``: learned caching (Learning-to-Cache, HarmoniCa), a step x unit router trained on a frozen DiT;
- ``feedback``: Inner Loop Feedback (ILF), a feedback block that forecasts a block's next-step features.

All of them step through the sampler's trajectory object (``ditlab.diffusion.trajectory``) and run the network
through its trunk (``ditlab.models.trunk``), so they follow every time grid, SDE and guidance interval. They run on
class-conditional DiTs and on text-to-image networks (PixArt, MM-DiT / FLUX blocks) alike: the learned ones roll a
text-conditioned teacher out on digit-scene captions, the empty caption as the null condition (``conditions.py``).
"""
