"""ernie-compile: an ahead-of-time compiler for the ERNIE 4.5 model family.

Stages, in order (see compiler/pipeline.py): load the checkpoint into transformers' own classes →
capture prefill and decode with torch.export → graph passes → lower to TVM Relax → build for a
target → package an artifact directory. runtime/ loads such a directory without torch.
"""

__version__ = "0.1.0"
