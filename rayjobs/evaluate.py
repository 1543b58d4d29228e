"""Ray job entrypoint: a model's evaluation on the cluster (`python -m rayjobs.evaluate ARGS`, the options of
`deepfake evaluate`): the stage's own parser, then `deepfake.stages.evaluate` (`deepfake.evaluate.evaluate`)."""

import sys

from deepfake.stages import run_job

if __name__ == "__main__":
    sys.exit(run_job("evaluate", sys.argv[1:]))
