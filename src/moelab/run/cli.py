"""What the entry points (train.py, eval.py, predict.py, generate.py) share on their command
line before Hydra sees it: mandatory keys, free text taken verbatim, missing plugins. Light:
no torch."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path


def take_verbatim(key: str, args: list[str]) -> tuple[list[str], list[str]]:
    """([the raw text of `key=<text>`] or [], the other args): Hydra's parser strips spaces
    and reads quotes and brackets, so free text such as a prompt is taken as typed."""
    found, rest = [], []
    for arg in args:
        if arg.startswith(f"{key}="):
            found = [arg[len(key) + 1:]]
        else:
            rest.append(arg)
    return found, rest


def require(keys: tuple[str, ...], args: list[str], usage: str) -> None:
    """One line and exit 1 when a mandatory `key=` is missing from the command line (Hydra's
    own message would be a "Missing mandatory value" paragraph and an empty run folder)."""
    missing = [key for key in keys if not any(arg.lstrip("+").startswith(f"{key}=") for arg in args)]
    if missing and not any(arg in ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help") or arg.startswith("--cfg")
                           for arg in args):
        sys.stderr.write(f"moelab: error: {' and '.join(f'{k}=' for k in missing)} missing: {usage}\n")
        sys.exit(1)


# Config choices that need a Hydra plugin from an extra: (override prefix, module, extra).
PLUGINS = (
    ("hparams_search=optuna", "hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "slurm"),
)


def check_plugins(args: list[str], find_spec=None) -> None:
    """One line and exit 1 when the command line picks a Hydra plugin that is not installed
    (Hydra's own message is a paragraph about its plugin search path)."""
    import importlib.util

    find_spec = find_spec or importlib.util.find_spec
    for arg in args:
        for prefix, module, extra in PLUGINS:
            if arg.lstrip("+").startswith(prefix):
                try:
                    found = find_spec(module) is not None
                except ModuleNotFoundError:
                    found = False
                if not found:
                    sys.stderr.write(f"moelab: error: {arg.lstrip('+')} needs a Hydra plugin that is not installed: "
                                     f"pip install -e \".[{extra}]\"\n")
                    sys.exit(1)


def check_run_folder(args: list[str], default: str = "outputs") -> None:
    """One line and exit 1 when the run's folder (`hydra.run.dir=`, `hydra.sweep.dir=` with
    -m, else `default` under the working directory) cannot be made: under a file, on a
    read-only or virtual file system. Hydra makes it before the run starts and reports a
    failure as a traceback. What this check creates it removes again."""
    multirun = any(arg in ("-m", "--multirun") for arg in args)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [arg.split("=", 1)[1] for arg in args if arg.lstrip("+").startswith(f"{key}=")]
    if given and "${" in given[-1]:
        return  # resolved by Hydra: checked when the run starts
    folder = Path(given[-1] if given else default).expanduser()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".moelab-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        shown = f"{key}={given[-1]}" if given else f"the run folder {folder.resolve()}"
        sys.stderr.write(f"moelab: error: {shown} cannot be made ({type(exc).__name__}: {exc.strerror or exc}): "
                         "pick a folder this user can write\n")
        sys.exit(1)
    finally:
        for made in missing:  # deepest first
            try:
                made.rmdir()
            except OSError:
                pass


# Settings that hold a path (the last part of the key): `~` and `$VAR` in them are expanded
# before Hydra parses the command line (its grammar cannot lex `~`, and it has no `$VAR`).
PATH_KEYS = frozenset({"ckpt_path", "init_from", "teacher", "root", "path", "images", "out", "data_files", "dirpath",
                       "save_dir", "dir", "output_dir", "default_root_dir", "tracking_uri"})
_ENV_VAR = re.compile(r"\$(?!\{)([A-Za-z_][A-Za-z0-9_]*)")


def expand_paths(args: list[str]) -> list[str]:
    """`data.root=~/data` → `data.root=/home/me/data`, `init_from=$RUNS/a.ckpt` → the variable's
    value, for path settings (PATH_KEYS); quoted for Hydra where the result needs it. An
    unset variable is one line and exit 1. Hydra's own `${...}` interpolations are left alone."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-") or key.lstrip("+~").rsplit(".", 1)[-1] not in PATH_KEYS:
            out.append(arg)
            continue
        if not (value.startswith("~") or _ENV_VAR.search(value)):
            out.append(arg)
            continue
        missing = [name for name in _ENV_VAR.findall(value) if name not in os.environ]
        if missing:
            sys.stderr.write(f"moelab: error: {arg}: ${missing[0]} is not set in this shell (export it, or write the path out)\n")
            sys.exit(1)
        expanded = os.path.expanduser(_ENV_VAR.sub(lambda m: os.environ[m[1]], value))
        out.append(f"{key}={expanded}" if _plain(expanded) else _hydra_quoted(key, expanded))
    return out


def _plain(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_./@%+:-]*", value) is not None


def _hydra_quoted(key: str, value: str) -> str:
    """`key='value'` in Hydra's quoting (one argv word: no shell quoting)."""
    escaped = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value)
    return f"{key}='{escaped}'"


def positional_checkpoint(args: list[str]) -> list[str]:
    """`eval.py <checkpoint> split=test` → `ckpt_path=<checkpoint> split=test`: every entry point
    that reads a checkpoint takes it as the first word or as `ckpt_path=`, as export_hf.py and
    merge_experts.py take theirs."""
    for i, arg in enumerate(args):
        if arg.startswith("-"):
            continue
        if "=" not in arg:
            given = f"ckpt_path={arg}" if _plain(arg) or arg.startswith("~") else _hydra_quoted("ckpt_path", arg)
            return [*args[:i], given, *args[i + 1:]]
        break
    return args


VERBOSE_ENV = "MOELAB_VERBOSE"


def prepare(args: list[str], checkpoint: bool = False) -> list[str]:
    """The command line as Hydra should see it: `--verbose` taken out (it shows the warnings
    and tips moelab filters: moelab.run.quiet), a positional checkpoint made `ckpt_path=`
    (`checkpoint`), `~` and `$VAR` expanded in path settings."""
    if "--verbose" in args:
        os.environ[VERBOSE_ENV] = "1"
        args = [a for a in args if a != "--verbose"]
    if checkpoint:
        args = positional_checkpoint(args)
    return expand_paths(args)


CONF = Path(__file__).resolve().parents[3] / "conf"


def _fail(line: str) -> None:
    sys.stderr.write(f"moelab: error: {line}\n")
    sys.exit(1)


def _options(group: str) -> list[str]:
    folder = CONF / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def check_overrides(args: list[str], config_name: str) -> None:
    """Hydra's composition errors as one line each, with the closest valid name, before Hydra
    runs (its own are paragraphs, and for a misspelt key advise adding it with `+`):

        router=swich: no such router; did you mean switch? options: aux_free, cosine, …
        trainer.max_step=20: trainer has no setting max_step; did you mean max_steps?
        routr=switch: no config group or setting routr; did you mean router?

    Sweeps (`a,b` under -m) are checked option by option; the rest composes as Hydra would."""
    from difflib import get_close_matches

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import (
        ConfigCompositionException,
        HydraException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf import OmegaConf

    if any(a in ("--help", "-h", "--hydra-help", "--info", "-i") or a.startswith(("--cfg", "-c", "--shell-completion"))
           for a in args):
        return  # Hydra answers these itself

    def did_you_mean(word: str, options: list[str]) -> str:
        close = get_close_matches(word, options, n=1, cutoff=0.5)
        return f"; did you mean {close[0]}?" if close else ""

    words = [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    parser = OverridesParser.create()
    parsed = []
    for word in words:
        try:
            parsed.append((word, parser.parse_override(word)))
        except (OverrideParseException, HydraException) as exc:
            _fail(f"{word}: Hydra cannot read it ({str(exc).splitlines()[0]}): quote a value with spaces, commas or "
                  "brackets as key='value'")
    plain = []
    for word, override in parsed:
        group = override.key_or_group
        options = _options(group)
        if options and not override.is_delete():
            value = override.value()
            values = ([str(v) for v in override.sweep_string_iterator()] if override.is_sweep_override() else
                      [str(v) for v in value] if isinstance(value, list) else [str(value)])
            for value in values:
                if value not in options and value != "null":
                    _fail(f"{group}={value}: no such {group}{did_you_mean(value, options) or ';'} options: "
                          f"{', '.join(options)}")
        if not override.is_sweep_override():
            plain.append(word)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            try:
                compose(config_name, overrides=plain)
            except (MissingConfigException, ConfigCompositionException) as exc:
                text = str(exc)
                key = text.split("'")[1] if "Could not override '" in text else None
                if key is None:
                    _fail(text.splitlines()[0])
                word = next((w for w in plain if w.lstrip("+~").split("=", 1)[0] == key), key)
                rest = [w for w in plain if w != word]
                cfg = compose(config_name, overrides=rest)
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                siblings = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
                if hasattr(node, "get") and node.get("_target_"):  # the class's own settings too
                    from moelab.run.settings import _parameters

                    siblings += sorted(_parameters(str(node.get("_target_"))) or [])
                if parent and leaf in siblings:  # the class takes it, the config does not list it
                    _fail(f"{word}: {parent}.{leaf} is a setting of {str(node.get('_target_')).rsplit('.', 1)[-1]} that "
                          f"the config does not list: add it with +{word.lstrip('+')}")
                if parent:
                    _fail(f"{word}: {parent} has no setting {leaf}{did_you_mean(leaf, siblings)}")
                groups = sorted(p.name for p in CONF.iterdir() if p.is_dir())
                _fail(f"{word}: no config group or setting {leaf}{did_you_mean(leaf, sorted({*siblings, *groups}))}")
    finally:
        GlobalHydra.instance().clear()


def show_help(args: list[str], usage: str) -> None:
    """`--help` / `-h`: this entry point's own usage (Hydra's would be train.py's groups), exit 0.
    `--hydra-help` still reaches Hydra."""
    if any(a in ("--help", "-h") for a in args):
        sys.stdout.write(usage.rstrip() + "\n")
        sys.exit(0)
