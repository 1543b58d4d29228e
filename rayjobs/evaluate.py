"""Ray job entrypoint: `deepfake evaluate ARGS` on the cluster (`python -m rayjobs.evaluate ARGS`)."""

import sys

from deepfake.stages import run_job

if __name__ == "__main__":
    sys.exit(run_job("evaluate", sys.argv[1:]))
