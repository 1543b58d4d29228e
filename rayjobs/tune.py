"""Ray job entrypoint: the Ray Tune search on the cluster (`python -m rayjobs.tune ARGS`, the options of
`deepfake tune`): the stage's own parser, then `deepfake.stages.tune`, which calls `deepfake.tune.run_search`."""

import sys

from deepfake.stages import run_job

if __name__ == "__main__":
    sys.exit(run_job("tune", sys.argv[1:]))
