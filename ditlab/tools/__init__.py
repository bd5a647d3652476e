"""Command-line tools that work from a checkpoint: ``ditlab sample``, ``ditlab convert``, ..."""
