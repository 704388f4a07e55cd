"""LAVIS's Config, with command-line model selection that works and config inheritance."""

import functools
import logging
import os

from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import OmegaConf

BASE_KEY = "base"
# datasets.<name>.builder: the registered builder of a dataset entry whose name is the user's own
# (two sets of one builder in a config: `products: {builder: own_caption, ...}`,
# `faces: {builder: own_caption, ...}`; a config's datasets are keyed by name)
BUILDER_KEY = "builder"
# run.runner when the config names none
DEFAULT_RUNNER = "runner_vpgtrans_base"


def load_config(path: str):
    """A yaml config; a top-level `base: <path>` (relative to this file) names a config this
    one extends: the base is loaded first and this file's entries override it. Baselines and
    variants of a recipe are written as their differences only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config not found: {path}")
    cfg = OmegaConf.load(path)
    base = cfg.pop(BASE_KEY, None)
    if base is None:
        return cfg
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(os.path.abspath(path)), base)
    return OmegaConf.merge(load_config(base_path), cfg)


class PluginConfig(Config):
    """LAVIS's Config with two changes:

    - `--options model.model_type=X` (or model.arch=Y) also picks the default model yaml;
      LAVIS looks the override up as kwargs["model.model_type"], a key the parsed options
      never have, so the config file's model_type always won;
    - config files may extend a base config (`base: ../vpgtrans.yaml`).
    """

    def __init__(self, args):
        self.config = {}
        self.args = args
        registry.register("configuration", self)
        user_config = self._build_opt_list(self.args.options)
        config = load_config(self.args.cfg_path)
        self.config = OmegaConf.merge(
            self.build_runner_config(config),
            self.build_model_config(config, **user_config),
            self.build_dataset_config(config),
            user_config)

    @staticmethod
    def build_model_config(config, **kwargs):
        user_model = kwargs.get("model", None) or {}
        overrides = {k: user_model[k] for k in ("arch", "model_type") if k in user_model}
        if overrides:
            config = OmegaConf.merge(config, {"model": overrides})
        model = config.get("model", None)
        if model is None:
            raise KeyError("the config has no 'model' section")
        _registered("model", model.get("arch", None), "model.arch")  # LAVIS: a bare assert
        return Config.build_model_config(config)

    @staticmethod
    def build_dataset_config(config):
        """LAVIS's (each entry over its builder's default yaml), where an entry named by the
        user (`builder:` key) takes the defaults its builder's yaml holds under the builder's name."""
        datasets = config.get("datasets", None)
        if datasets is None:
            raise KeyError("the config has no 'datasets' section")
        register_dataset_aliases(datasets)
        merged = OmegaConf.create()
        for name in datasets:
            entry = datasets[name] or {}
            builder_cls = _registered("builder", name, f"datasets.{name}")
            default = OmegaConf.load(builder_cls.default_config_path(type=entry.get("type", "default")))
            own_defaults = default.datasets[getattr(builder_cls, "alias_of", name)]
            if "name" in own_defaults:  # messages name the dataset as the config does
                own_defaults.name = name
            merged = OmegaConf.merge(merged, {"datasets": {name: own_defaults}}, {"datasets": {name: entry}})
        return merged


def register_dataset_aliases(datasets) -> None:
    """Registers, for each dataset entry with a `builder:` key, a subclass of that builder under the
    entry's name (LAVIS's tasks look builders up by the config's dataset names)."""
    for name in datasets or {}:
        entry = datasets[name]
        target = entry.get(BUILDER_KEY, None) if entry is not None else None
        if target is None:
            continue
        base = _registered("builder", target, f"datasets.{name}.{BUILDER_KEY}")
        known = registry.mapping["builder_name_mapping"].get(name, None)
        if known is not None:
            if getattr(known, "alias_of", None) == target and known.__bases__ == (base,):
                continue  # registered by an earlier config of this process
            raise ConfigKeyError(f"datasets.{name}: {name!r} is already a registered builder "
                                 f"({known.__module__}.{known.__name__}); give a dataset with "
                                 f"`{BUILDER_KEY}: {target}` a name of your own")
        alias = type(f"{base.__name__}_{name}", (base,), {"alias_of": target, "__module__": base.__module__})
        registry.register_builder(name)(alias)


# ---------------------------------------------------------------------------- key checks

class ConfigKeyError(KeyError):
    """A config key or registry name nothing reads: the message names it and the closest known one."""

    def __str__(self):  # KeyError would print the message quoted
        return str(self.args[0])


# OmegaConf methods, not keys, when seen as `cfg.<name>`
_METHODS = {"get", "pop", "keys", "items", "values", "copy", "setdefault", "update", "merge"}


def keys_read(objs, holder: str) -> set:
    """The keys the source of `objs` (classes, with their bases, or modules) reads from a config
    node named `holder` (the last part of the expression: `self.config.run_cfg` and `run_cfg`
    are both "run_cfg"): `holder.get("k")`, `holder["k"]`, `holder.k`. What is accepted is
    what the code reads, so a class registered by a user is covered as soon as it is loaded."""
    return set().union(*(_keys_read_one(obj, holder) for obj in objs))


@functools.lru_cache(maxsize=None)
def _keys_read_one(obj, holder: str) -> frozenset:
    import ast
    import inspect
    import textwrap

    sources = []
    for part in (obj.__mro__[:-1] if inspect.isclass(obj) else [obj]):
        try:
            sources.append(textwrap.dedent(inspect.getsource(part)))
        except (OSError, TypeError):  # built-in or generated: nothing to read
            continue

    def is_holder(node):
        return isinstance(node, (ast.Name, ast.Attribute)) and ast.unparse(node).split(".")[-1] == holder

    def const(node):
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    keys = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop") \
                    and is_holder(node.func.value) and node.args and const(node.args[0]):
                keys.add(const(node.args[0]))
            elif isinstance(node, ast.Subscript) and is_holder(node.value) and const(node.slice):
                keys.add(const(node.slice))
            elif isinstance(node, ast.Attribute) and is_holder(node.value) and node.attr not in _METHODS:
                keys.add(node.attr)
    return frozenset(keys)


def _closest(name: str, known) -> str:
    import difflib

    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _registered(kind: str, name, what: str) -> type:
    cls = registry.mapping[f"{kind}_name_mapping"].get(name, None) if isinstance(name, str) else None
    if cls is None:
        known = registry.mapping[f"{kind}_name_mapping"]
        raise ConfigKeyError(f"{what}={name!r} is not registered{_closest(str(name), known)} "
                             f"(registered: {', '.join(sorted(known))})")
    return cls


def runner_class(run_cfg) -> type:
    """The registered runner class that `run.runner` names (DEFAULT_RUNNER when unset)."""
    return _registered("runner", run_cfg.get("runner", DEFAULT_RUNNER), "run.runner")


# an entry of run.extra_validation: what runners/extra_validation.py (build_benchmark) reads
EXTRA_VALIDATION_KEYS = frozenset({"name", "cfg_path", "split", "datasets", "run"})


def check_config(cfg, readers=()) -> None:
    """Every key of the run, model and dataset sections must be one the registered runner, task,
    model and builders (or this plugin's entry points) read, and every registry name must
    exist -- checked before anything is built, so a typo fails at once, not as a silently
    ignored setting or after a stage of training. `readers`: more modules or classes whose
    reads of `run_cfg` count (the launcher that calls this passes itself). Keys read by code
    this scan cannot see (a user's extension reading config some other way) are listed in
    `run.unchecked_keys`, as dotted names (e.g. [model.my_option])."""
    import lavis.tasks

    from lavis_vpgtrans.common import dist as plugin_dist

    run_cfg, model_cfg = cfg.run_cfg, cfg.model_cfg
    unchecked = set(run_cfg.get("unchecked_keys", None) or [])
    runner_cls = runner_class(run_cfg)
    task_cls = _registered("task", run_cfg.get("task", None), "run.task")
    lr_sched = run_cfg.get("lr_sched", None)
    if lr_sched is not None and not run_cfg.get("evaluate", False):
        _registered("lr_scheduler", lr_sched, "run.lr_sched")
    model_cls = _registered("model", model_cfg.get("arch", None), "model.arch")
    builders = {name: _registered("builder", name, f"datasets.{name}") for name in cfg.datasets_cfg}

    def check(section: str, node, known, elsewhere=frozenset()) -> None:
        for key in node.keys():
            dotted = f"{section}.{key}"
            if key in known or dotted in unchecked:
                continue
            if key in elsewhere:  # e.g. a baseline extending a two-stage config with a one-stage runner
                logging.warning("config key %r is not read by this run's runner, task or builders: ignored", dotted)
                continue
            hint = _closest(str(key), set(known) | set(elsewhere))
            raise ConfigKeyError(f"unknown config key {dotted!r}{hint} (if your own code reads it, list it in "
                                 f"run.unchecked_keys)")

    known_run = keys_read([runner_cls, task_cls, runner_class, *readers, plugin_dist, lavis.tasks,
                           *builders.values()], "run_cfg") | {"unchecked_keys"}
    others = [*registry.mapping["runner_name_mapping"].values(), *registry.mapping["task_name_mapping"].values()]
    check("run", run_cfg, known_run, keys_read(others, "run_cfg"))
    # run.extra_validation entries (runner_base.extra_benchmarks): their keys, the benchmarks'
    # dataset names and the run settings they override in the benchmark's config
    known_task_run = keys_read([*registry.mapping["task_name_mapping"].values(), lavis.tasks], "run_cfg")
    for i, entry in enumerate(run_cfg.get("extra_validation", None) or []):
        where = f"run.extra_validation[{i}]"
        check(where, entry, EXTRA_VALIDATION_KEYS)
        check(f"{where}.run", entry.get("run", None) or {}, known_task_run)
        for name in entry.get("datasets", None) or {}:
            _registered("builder", name, f"{where}.datasets.{name}")

    llm = model_cfg.get("llm_model", None)
    if isinstance(llm, str) and llm.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(llm)):
        # transformers would read it as a hub id and say "Repo id must be in the form ..."
        raise FileNotFoundError(f"model.llm_model={llm}: no such directory (a local LLM checkpoint directory, "
                                f"or a hub id such as facebook/opt-2.7b)")
    model_yaml = OmegaConf.load(model_cls.default_config_path(model_cfg.get("model_type")))
    known_model = keys_read([model_cls], "cfg") | set(model_yaml.model.keys()) | {"arch", "model_type"}
    if hasattr(model_cls, "config_keys"):  # our models' from_config reads the constructor's parameters
        known_model |= set(model_cls.config_keys())
    check("model", model_cfg, known_model)

    for name, builder_cls in builders.items():
        default = OmegaConf.load(builder_cls.default_config_path(cfg.datasets_cfg[name].get("type", "default")))
        own_defaults = default.datasets[getattr(builder_cls, "alias_of", name)]
        known = keys_read([builder_cls], "config") | set(own_defaults.keys()) | {"type", BUILDER_KEY}
        check(f"datasets.{name}", cfg.datasets_cfg[name], known)
