"""Doctest collection: the optional bridges are only importable where their framework is installed."""

import importlib.util

collect_ignore = ["docs/make_figures.py"] + [  # the figure script is run by hand, with matplotlib
    path
    for path, module in (("fastconv/torch.py", "torch"), ("fastconv/dask.py", "dask"))
    if importlib.util.find_spec(module) is None
]
