"""End-to-end decode / prefill benchmark of ffsplit exports against dense fp32 and MatMulNBits.

Builds an MPT-shaped model with random weights (default: d_model 2048, 8 layers, expansion 4,
vocab 8192, 419 M params), exports it with optimum (dense fp32), MatMulNBits int8 / int4 and
ffsplit (``--target ort-cpu --other-linear int4``) at each light sparsity, then times every
variant in one process, interleaved, and prints a markdown table and writes JSON.
See ``ffsplit_export/bench/__init__.py`` for the definitions of the reported quantities.

    python samples/bench_e2e.py --work /tmp/bench-e2e --output bench_e2e.json          # full shape
    python samples/bench_e2e.py --quick --work /tmp/bench-e2e --output quick.json      # smoke run
"""

from __future__ import annotations

import sys

from ffsplit_export.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
