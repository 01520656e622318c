"""The user-facing tools as modules, so an installed ppdistill runs from any directory, e.g. the root of a
PaddleDetection checkout with its own configs::

    python -m ppdistill.tools.train -c configs/picodet/... --slim_config my_distill.yml --eval
    ppdistill-train -c ...        # the same, as an installed command

``tools/*.py`` in a ppdistill checkout are thin wrappers around these modules.
"""
