"""Fine-tune and evaluate on SCROLLS: `python run_finetune.py --recipe recipes/gov_report.yaml [key=value ...]`.

Multi-process: `accelerate launch run_finetune.py --recipe ...`. Same as `scrolls-ssm train`: a user error is one
line on stderr with exit status 2; `--debug` shows its traceback.
"""

import sys

from scrolls_ssm.cli import run_finetune_main

if __name__ == "__main__":
    sys.exit(run_finetune_main(sys.argv[1:]))
