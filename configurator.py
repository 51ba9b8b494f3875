"""
nanoGPT-style configuration: defaults are a script's module globals; the command line names
config files (Python, exec'd in order) and --key=value overrides (ast.literal_eval, falling
back to the raw string). Used by train.py and sample.py:

    python train.py config/learned_shift0.py --batch_size=32 --compile=True

Unlike nanoGPT's exec'd configurator, mistakes come back as one ConfigError line: unknown
key (with the closest known one), wrong type, malformed argument, missing config file.
"""

import ast
import difflib
import os
import types


class ConfigError(ValueError):
    pass


def check_value(key, value, default, source):
    """The value to store for key, or ConfigError if its type does not fit the default's.
    An int may stand for a float; a None default accepts anything, and so does a value of None
    for a setting whose default is a string (e.g. a run name)."""
    if default is None or value is None and isinstance(default, str):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is type(default):
        return value
    raise ConfigError(f"{source}: {key} expects {type(default).__name__} (like {default!r}), "
                      f"got {value!r} ({type(value).__name__})")


def unknown_key(key, known, source):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def configure(config, argv):
    """Apply argv (config files and --key=value) to the dict of defaults `config`, in place."""
    known = sorted(config)
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: {arg} (config files live in config/, e.g. "
                                  f"config/quick_learned.py)")
            with open(arg) as f:
                code = f.read()
            scope = dict(config)
            try:
                exec(compile(code, arg, 'exec'), {}, scope)
            except Exception as e:
                raise ConfigError(f"{arg} failed to run: {type(e).__name__}: {e}")
            for key, value in scope.items():
                if key.startswith('_') or isinstance(value, types.ModuleType):
                    continue  # private helpers and imports (e.g. math for pi) are not settings
                if key not in config:
                    raise unknown_key(key, known, arg)
                config[key] = check_value(key, value, config[key], arg)
        else:
            key, eq, raw = arg[2:].partition('=')
            if not eq or not key:
                raise ConfigError(f"malformed argument '{arg}': write --key=value (e.g. --compile=True)")
            if key not in config:
                raise unknown_key(key, known, arg)
            try:
                value = ast.literal_eval(raw)
            except (SyntaxError, ValueError):
                value = raw  # a bare string such as --out_dir=out/run1
            if isinstance(config[key], str) and value is not None:
                value = raw  # a string setting keeps the text as typed: --wandb_run_name=2024, --shapes=seed,quick
            config[key] = check_value(key, value, config[key], arg)
    return config
