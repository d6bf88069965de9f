"""lm-eval's own command line with the `k2` model type registered:

python -m k2_rl.evaluation.lm_eval_cli --model k2 --model_args path=URI --tasks ...
k2 lm-eval --model k2 --model_args path=URI --tasks ...        (the same)
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Register `k2` with lm-eval, then run lm-eval's CLI on `argv` (default: sys.argv[1:])."""
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_adapter  # noqa: F401  (registers the model type)

    if argv is not None:
        sys.argv = ["lm-eval", *argv]  # lm-eval parses sys.argv itself
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
