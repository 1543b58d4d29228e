"""Ray job entrypoint: batch prediction with Ray Data on the cluster (`python -m rayjobs.predict ARGS`, the
options of `deepfake predict`): the stage's own parser, then `deepfake.stages.predict` (`deepfake.predict.predict`)."""

import sys

from deepfake.stages import run_job

if __name__ == "__main__":
    sys.exit(run_job("predict", sys.argv[1:]))
