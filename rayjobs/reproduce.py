"""Ray job entrypoint: retrain the shipped model, every stage, then evaluate it (`python -m rayjobs.reproduce
--data PATH --out DIR [--recipe NAME] [train options]`): `deepfake.stages.reproduce`."""

import sys

from deepfake.stages import run_job

if __name__ == "__main__":
    sys.exit(run_job("reproduce", sys.argv[1:]))
