"""How far perturb / restore rounding moves bf16 weights when the update is nil: 1000 steps at
lr = 0 on a 512×512 bf16 Linear, per optimizer (MeZO, LOZO, LOZO-M) and mode (in place with
stochastic and with nearest rounding, shadow, virtual); relative drift ‖W − W₀‖ / ‖W₀‖ of the
settled weights. A wrapper of `python bench/tools/precision.py drift --dtypes bfloat16` (which also
runs fp16 and writes JSON with --out).

Usage: python bench/tools/drift_bf16.py [precision.py drift options] (CPU, about 1.5 minutes)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from precision import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["drift", "--dtypes", "bfloat16", *sys.argv[1:]]))
