"""The ``lesiondiffusion`` command line: chains the bundles and wraps the shared tools."""

import os

# numpy advises the kernel to back large arrays with transparent huge pages (read once, when numpy is
# first imported). Where huge pages are scarce every fresh array then faults through memory compaction:
# 4-6 s of an 18 s synthesis on a 2-core VM (README, the end-to-end benchmark). The command line owns
# its process, so it turns the advice off unless the user chose (NUMPY_MADVISE_HUGEPAGE=1 turns it on).
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
