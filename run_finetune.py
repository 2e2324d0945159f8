"""Fine-tune and evaluate on SCROLLS: `python run_finetune.py --recipe recipes/gov_report.yaml [key=value ...]`.

Multi-process: `accelerate launch run_finetune.py --recipe ...`. Same as `scrolls-ssm train`.
"""

import sys

from scrolls_ssm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
