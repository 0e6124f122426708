"""What a run is called: its overrides as a name (a multirun job's TensorBoard run, a single
run's folder suffix), and those keys a multirun's jobs share. Light: no torch."""

from __future__ import annotations

import sys
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

# The command line as launched (before moelab.run.launch rewrites sys.argv for relaunched ranks):
# a multirun's own overrides, to tell the keys every job shares from the swept ones.
LAUNCH_ARGS = list(sys.argv[1:])
# Overrides that say where a run reads or writes, not what it is: never in a run's name.
UNNAMED_KEYS = ("ckpt_path",)


def shared_override_keys(args: Sequence[str]) -> set[str]:
    """Keys a multirun's command line sets to one value (`debug=default`, `seed=0`), so every
    job has them: everything that is not a sweep (`a,b`, `range(...)`, `choice(...)`, ...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a name is cosmetic: name runs by all their overrides
        return set()
    return {o.key_or_group for o in parsed if not o.is_sweep_override()}


def run_name(overrides: Sequence[str], leave_out: set[str] = frozenset()) -> str:
    """`experts=16,router=switch`: the overrides (sorted, as Hydra's override_dirname), without
    `leave_out` and UNNAMED_KEYS, with no `/` (a folder level) and at most 200 characters."""
    kept = sorted(o for o in overrides if parse_override(o)[0] not in leave_out | set(UNNAMED_KEYS))
    return ",".join(kept).replace("/", "_")[:200]


def run_version() -> str:
    """TensorBoard `version` for this job: its overrides without those every job of the
    multirun shares (e.g. `experts=16,router=switch`), so `tensorboard --logdir <sweep folder>`
    names each run by what sets it apart; "" in a single run (logs go straight to
    `tensorboard/`; the run's folder carries its overrides: `run_folder_suffix`)."""
    if not HydraConfig.initialized():
        return ""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return ""
    return run_name(list(hydra_cfg.overrides.task), shared_override_keys(LAUNCH_ARGS)) or str(hydra_cfg.job.num)


def run_folder_suffix(override_dirname: str = "") -> str:
    """`_<overrides>` for a single run's folder name (`outputs/runs/<time>_experts=16,router=switch`),
    "" without overrides: `hydra.run.dir` interpolates it with `hydra.job.override_dirname`."""
    if not HydraConfig.initialized():
        return ""
    name = run_name(list(HydraConfig.get().overrides.task))
    return f"_{name[:120]}" if name else ""


def parse_override(override: str) -> tuple[str, str]:
    """`router=topk` → ("router", "topk"); `+a.b=1` → ("a.b", "1"); `~key` → ("key", "(deleted)")."""
    if override.startswith("~"):
        return override.lstrip("~").split("=", 1)[0], "(deleted)"
    key, _, value = override.lstrip("+").partition("=")
    return key, value
