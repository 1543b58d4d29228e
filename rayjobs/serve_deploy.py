"""Ray job entrypoint: deploy a Serve config file to this cluster (`python -m rayjobs.serve_deploy --config
serve_config.yaml --model DIR [--http-port P]`), like `serve run CONFIG --non-blocking`, and wait until the
applications are RUNNING. They keep serving after the job ends (Serve's controller is detached)."""

import sys

from deepfake.stages import run_job

if __name__ == "__main__":
    sys.exit(run_job("serve", sys.argv[1:]))
