"""Command-line tools that work from a checkpoint or a dataset: ``ditlab sample``, ``eval``, ``analyze``, ``convert``,
``encode``; each is a typed function run by :mod:`ditlab.tools.command`."""
