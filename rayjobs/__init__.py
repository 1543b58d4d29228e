"""One Ray job entrypoint per stage; each is a thin call into `deepfake.stages.run_job` (see README.md here)."""
