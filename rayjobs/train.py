"""Ray job entrypoint: `deepfake train ARGS` on the cluster (`python -m rayjobs.train ARGS`)."""

import sys

from deepfake.stages import run_job

if __name__ == "__main__":
    sys.exit(run_job("train", sys.argv[1:]))
