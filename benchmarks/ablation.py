"""Ablation on latent10 at equal student training samples (the quality harness with the ablation set).

    python benchmarks/ablation.py                       # perflow -> OTA windows -> +progressive -> +aligned-v
                                                        # -> +online fresh / student -> +adversarial (trajflow)
    python benchmarks/ablation.py --steps 800           # a smaller budget

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
