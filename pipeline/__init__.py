"""params.yaml to run objects, and the Ray Train / Tune layer.

Ray reads its environment settings once, when first imported: importing this package sets
the pipeline's (pipeline.cluster) before any of its modules imports Ray.
"""
from . import cluster  # noqa: F401
