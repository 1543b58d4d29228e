"""One Ray job entrypoint per stage: each reads its arguments with the stage's own parser and runs the stage's
function in `deepfake.stages` (see README.md here)."""
