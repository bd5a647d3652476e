"""Learned feature caching: a step x unit router trained on a frozen DiT (Learning-to-Cache, HarmoniCa), exported
to a static plan that the training-free ``plan`` cache policy runs (``ditlab.methods.sampling.caches.plan``)."""

from ditlab.methods.sampling.cache_router.callbacks import ImageErrorProxy
from ditlab.methods.sampling.cache_router.module import CacheRouterModule, RouterConfig
from ditlab.methods.sampling.cache_router.proxy import image_error_proxy, image_error_proxy_reference
from ditlab.methods.sampling.cache_router.routed import routed_call
from ditlab.methods.sampling.cache_router.router import StepUnitRouter

__all__ = ["CacheRouterModule", "ImageErrorProxy", "RouterConfig", "StepUnitRouter", "image_error_proxy",
           "image_error_proxy_reference", "routed_call"]
