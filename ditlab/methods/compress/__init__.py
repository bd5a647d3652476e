"""dicomp: analyse, prune and distil a trained DiT into a shallower student."""
