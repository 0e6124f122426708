"""What a run is called: its overrides as a name (a multirun job's TensorBoard run, a single
run's folder suffix), and those keys a multirun's jobs share. Light: no torch."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

# The command line as launched (before moelab.run.launch rewrites sys.argv for relaunched ranks):
# a multirun's own overrides, to tell the keys every job shares from the swept ones.
LAUNCH_ARGS = list(sys.argv[1:])
LAUNCH_SCRIPT = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "train.py"
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


def display_name() -> str:
    """A run's name for loggers that show runs side by side (W&B, MLflow): a multirun job's
    own overrides (as its TensorBoard run), a single run's overrides, or "defaults"."""
    if not HydraConfig.initialized():
        return "run"
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return run_version()
    return run_name(list(hydra_cfg.overrides.task)) or "defaults"


def run_folder_suffix(override_dirname: str = "") -> str:
    """`-<6 hex digits>` for a single run's folder name (`outputs/runs/2026-12-01_10-00-00-3fa2c1`):
    a hash of its overrides, so runs started in the same second with different overrides get
    different folders, while the path stays safe to paste into any `key=path` override on any
    shell (no `=`, `,` or spaces). "" without overrides. The overrides themselves are in the
    run's `.hydra/overrides.yaml`, its config tree and its TensorBoard hparams."""
    if not HydraConfig.initialized():
        return ""
    name = run_name(list(HydraConfig.get().overrides.task))
    return f"-{hashlib.sha1(name.encode()).hexdigest()[:6]}" if name else ""


# Values Hydra's override grammar and every shell take as they are; others are quoted for both.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./@%+:-]*")


def override(key: str, value: object) -> str:
    """`key=value` as one command-line word that Hydra parses back to `value`, pasteable on
    any POSIX shell: plain paths as they are, anything else in Hydra's quotes, shell-quoted."""
    text = str(value)
    if not _PLAIN_VALUE.fullmatch(text) or text.startswith("~"):
        # Hydra's quoted strings: a quote, and backslashes before a quote or the end, are escaped.
        text = "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text) + "'"
    return shlex.quote(f"{key}={text}")


def rerun_command(**extra: object) -> str:
    """The command line of this run with `extra` overrides in place of its own (e.g. the
    resume command, `ckpt_path=<newest checkpoint>`), to paste back as printed."""
    own: list[str] = list(LAUNCH_ARGS)
    if HydraConfig.initialized():
        own = list(HydraConfig.get().overrides.task)
    kept = [o for o in own if parse_override(o)[0] not in extra]
    script = LAUNCH_SCRIPT
    if os.path.isabs(script) and not os.path.relpath(script).startswith(".."):
        script = os.path.relpath(script)
    words = ["python", shlex.quote(script), *(shlex.quote(o) for o in kept), *(override(k, v) for k, v in extra.items())]
    return " ".join(words)


def parse_override(override: str) -> tuple[str, str]:
    """`router=topk` → ("router", "topk"); `+a.b=1` → ("a.b", "1"); `~key` → ("key", "(deleted)")."""
    if override.startswith("~"):
        return override.lstrip("~").split("=", 1)[0], "(deleted)"
    key, _, value = override.lstrip("+").partition("=")
    return key, value
