"""Support code of the stage scripts: models and sampling (lm), JSONL and curves (runs), one-line errors and
flag checks (checks), the episode record (episode), ALFWorld's and τ²-bench's glue (alfworld_env, tau2_env),
torchrun (distributed), the memory plan (memory), the CPU experiment's report (report). Nothing here imports a
stage script."""
