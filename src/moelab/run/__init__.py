"""One experiment, from a composed config to its record: check the config and build its objects
(build.py), train and test (train.py), end in one line on a mistake (errors.py), check the
checkpoints it starts from (checkpoints.py), write metrics.json (records.py) and a summary
(summary.py). names.py and resolvers.py serve the configs; cli.py and launch.py the entry
points and the processes that start a run. train.py's `run(cfg)` is what `python train.py`
calls. Nothing here is imported by the floors below (moe, models, tasks)."""
