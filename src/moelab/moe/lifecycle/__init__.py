"""The steps around training, as plain weight operations on MoE layers (torch only):
upcycling a dense model into an MoE (upcycle.py) and merging a trained MoE's experts into
fewer (merge.py). The runs that use them (init_from, scripts/merge_experts.py) live above."""
