"""Ray job entrypoint: Ray Train on the cluster, then the model export (`python -m rayjobs.train ARGS`, the
options of `deepfake train`): the stage's own parser, then `deepfake.stages.train`, which calls `deepfake.train.fit`."""

import sys

from deepfake.stages import run_job

if __name__ == "__main__":
    sys.exit(run_job("train", sys.argv[1:]))
