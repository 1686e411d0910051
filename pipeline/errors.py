"""Errors a stage reports as one clear line (no traceback): the run failed for a stated reason."""


class PipelineError(RuntimeError):
    """A training run or sweep trial failed; the message carries the original error."""
