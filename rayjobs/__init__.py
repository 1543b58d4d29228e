"""One Ray job entrypoint per stage; each is a thin call into `deepfake.jobs.run_job` (see README.md here)."""
