"""A trained model put to use: evaluated on a split (evaluate.py, eval.py), classifying images
(predict.py, predict.py), writing text (generate.py, generate.py), exported to transformers
(export_hf.py, scripts/export_hf.py). The model comes from its checkpoint alone:
`moelab.load(path)` (moelab.tasks.checkpoint_io)."""
