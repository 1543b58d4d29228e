"""Ray job entrypoint: `deepfake predict ARGS` on the cluster (`python -m rayjobs.predict ARGS`)."""

import sys

from deepfake.stages import run_job

if __name__ == "__main__":
    sys.exit(run_job("predict", sys.argv[1:]))
