"""Method families over the DiT core, one package each (``align``, ``compress``, ``moe``, ``graft``, ``dynamic``,
``sampling/*``). A family registers the kinds it brings (block components, trunks, cache policies) when its package
is imported; ``ditlab.plugins.load_plugins`` imports them all, and a registry asked for a name it does not know
calls it, so nothing here has to list them."""
