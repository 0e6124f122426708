"""LightningModules: a model, its loss, its metrics and its optimiser."""
