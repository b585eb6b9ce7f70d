"""``python -m fastortho.kernels.aot --arch 90 --shape 4096x4096 --dtype bf16 --out DIR``."""
import sys

from .cli import main

sys.exit(main())
