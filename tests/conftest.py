"""Tests run tiny models, for which one intra-op thread beats two (no sync overhead, and the
2-core CI machine also runs Ray workers and stage subprocesses)."""
import torch

torch.set_num_threads(1)
