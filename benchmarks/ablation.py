"""Ablation at equal student training samples (the quality harness with the ablation set), several seeds.

    python benchmarks/ablation.py                       # latent10: perflow -> OTA windows -> +progressive ->
                                                        # +aligned-v -> +online fresh / student -> +adversarial;
                                                        # OTA windows -> unrolled (the student's own 4-step
                                                        # solve) -> +progressive-unrolled / trajflow (+OTA)
    python benchmarks/ablation.py --teacher digits:8x8  # the same on the digits testbed
    python benchmarks/ablation.py --steps 800 --seeds 5 # another budget / more seeds

Each component's effect is the paired (same seed) difference "with - without" and its 95% t-interval over
seeds (``effects`` in the JSON): it "helps" or "hurts" only where that interval excludes zero, and has
"no measurable effect" otherwise.

Teachers are reported at 1/2/4 steps on diffusers' default FlowMatchEuler grid and on
``few_step_sigmas``, and at 32 steps. Same flags as ``benchmarks/quality.py``; prints one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import main  # noqa: E402

if __name__ == "__main__":
    main(default_methods="ablation")
