"""``ditlab export --ckpt RUN.ckpt --out PATH``: a method run's result in the form the sampling tools run.

A learned-cache router run (``CacheRouterModule``: L2C, HarmoniCa) becomes a static plan, a JSON file that
``ditlab sample --ckpt TEACHER --cache plan:PATH`` runs; a dynamic-compute run (DyDiT, Elastic-DiT, dynamic
chunking) becomes its inference form, a plain ditlab checkpoint whose trunk slices weights, gathers tokens and
skips blocks, which ``ditlab sample`` and ``ditlab eval`` run as it is. Other runs have nothing to export
(``ditlab convert`` writes a network for other libraries).
"""

from __future__ import annotations

from ditlab.checkpoint import read_checkpoint


def export(ckpt: str, out: str, threshold: float | None = None, sampler: str | None = None,
           steps: int | None = None) -> int:  # fmt: skip
    """Export a cache-router run as a static cache plan, or a dynamic-compute run in its inference form.

    Args:
        ckpt: a checkpoint of a cache-router or dynamic-compute run (``checkpoints/final.ckpt``).
        out: the plan file (router runs) or checkpoint file (dynamic runs) to write.
        threshold: router runs: the score above which a unit is computed; default: the one it was trained with.
        sampler: router runs: the sampler to export for; it must be the one the router was trained for.
        steps: router runs: the step count to export for; it must be the one the router was trained for.
    """
    checkpoint = read_checkpoint(ckpt)
    if "cache_router" in checkpoint:
        from ditlab.methods.sampling.cache_router.export import plan_from_checkpoint

        plan = plan_from_checkpoint(ckpt, threshold, sampler, steps)
        path = plan.save(out)
        print(f"wrote {path}: {plan.describe()}, {plan.computed_fraction:.1%} of the units computed; sample with "
              f"`ditlab sample --ckpt TEACHER --cache plan:{path}`")  # fmt: skip
        return 0
    trunk = checkpoint.get("ditlab", {}).get("dit_config", {}).get("trunk", "blocks")
    if trunk == "blocks":
        raise ValueError(f"{ckpt} is neither a cache-router run nor a dynamic-compute run, so it has nothing to "
                         "export; `ditlab convert` writes a network for other libraries")  # fmt: skip
    given = [name for name, value in (("threshold", threshold), ("sampler", sampler), ("steps", steps))
             if value is not None]  # fmt: skip
    if given:
        raise ValueError(f"--{given[0]} applies to cache-router runs; {ckpt} is a dynamic-compute ({trunk}) run")
    from ditlab.methods.dynamic.export import export_checkpoint

    path = export_checkpoint(ckpt, out)
    print(f"wrote {path}: the {trunk} network in its inference form; sample with `ditlab sample --ckpt {path}`")
    return 0
