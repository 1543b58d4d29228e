"""Ray job entrypoint: `deepfake tune ARGS` on the cluster (`python -m rayjobs.tune ARGS`)."""

import sys

from deepfake.stages import run_job

if __name__ == "__main__":
    sys.exit(run_job("tune", sys.argv[1:]))
