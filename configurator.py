"""
nanoGPT-style configuration: defaults are a script's module globals; the command line names
config files (Python, exec'd in order) and --key=value overrides (ast.literal_eval, falling
back to the raw string). Used by train.py, sample.py, bench.py and reproduce.py:

    python train.py config/learned_shift0.py --batch_size=32 --compile=True

Unlike nanoGPT's exec'd configurator, mistakes come back as one ConfigError line: unknown
key (with the closest known one), wrong type, a value outside its rule, malformed argument,
missing config file. `--help` prints the options with their defaults and the comments written
beside them in the script, so the help text is never written twice.
"""

import ast
import difflib
import math
import os
import re
import sys
import types


class ConfigError(ValueError):
    pass


# a seed's rule, for every script that has one: torch seeds take 64 bits, and the scripts add small offsets
# to a seed (seed + rank, seed + 1 for the evaluation batches), so the top half of that range is left out
SEED_RULE = ('0 <= x < 2**63', 'an integer in [0, 2**63)')


def exit_on_signal_during_startup(script):
    """Until a script installs its own handler, SIGINT/SIGTERM mean nothing was done yet: one line, then
    leave at once with the conventional code 128 + signal, so that `train.py ... && sample.py ...` stops.
    Here, in a module of the standard library's imports only, so that a script installs it before its slow
    imports (torch). os._exit, not sys.exit: a SystemExit raised inside a half-done import can abort the
    interpreter's shutdown; start-up writes only whole files by rename, and locks are released by the kernel."""
    import signal

    def handler(signum, frame):
        print(f"{script}: stopped by {signal.Signals(signum).name} during start-up; nothing was trained",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def check_value(key, value, default, source):
    """The value to store for key, or ConfigError if its type does not fit the default's.
    An int may stand for a float; a None default accepts anything (its rule checks it), and None
    is accepted for any key (rules decide whether None is allowed, see check_rules)."""
    if isinstance(value, float) and not math.isfinite(value):  # 1e400 is inf: it would pass every x >= 0 rule
        raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
    if default is None or value is None:
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


def check_rules(config, rules, defaults):
    """Every rule is a Python expression in x (the value), e.g. 'x >= 1' or "x in ('a', 'b')",
    or a pair (expression, what it means in words). A value of None is only valid where the
    default is None or the rule mentions None."""
    for key, value in config.items():
        rule = rules.get(key)
        words = None
        if isinstance(rule, tuple):
            rule, words = rule
        if value is None:
            if defaults.get(key) is None or rule is None and isinstance(defaults.get(key), str) or rule and 'None' in rule:
                continue
            raise ConfigError(f"{key} cannot be None (default {defaults[key]!r})")
        if rule is None:
            continue
        try:
            ok = eval(rule, {'math': math}, {'x': value})
        except TypeError:
            ok = False
        if not ok:
            if words is None:  # 'x >= 1' reads "must be >= 1"; '0 <= x < 1' reads "must satisfy 0 <= key < 1"
                words = 'be ' + rule[2:] if rule.startswith('x ') else 'satisfy ' + re.sub(r'\bx\b', key, rule)
            else:
                words = 'be ' + words
            raise ConfigError(f"{key}={value!r} is not valid: {key} must {words}")


def option_comments(script):
    """{name: comment} from the `name = value  # comment` lines of a script, and the section
    headings (comment-only lines) in order, as [('# heading', None) | (name, comment)]."""
    entries = []
    with open(script) as f:
        lines = f.readlines()
    rules = [i for i, line in enumerate(lines) if line.startswith('# ---')]
    if len(rules) >= 2:  # the defaults sit between the first two rules, as in nanoGPT's train.py
        lines = lines[rules[0] + 1:rules[1]]
    for line in lines:
        m = re.match(r'^(\w+)\s*=\s*.*?(?:#\s*(.*))?$', line.rstrip())
        if m and not line.startswith(' '):
            entries.append((m.group(1), (m.group(2) or '').strip()))
        elif line.startswith('# ') and not line.startswith('# ---'):
            entries.append((line[2:].strip(), None))
    return entries


def print_help(config, script, doc, extra_help=()):
    """The script's docstring (its usage lines), then every option: default and comment. extra_help
    adds entries, as option_comments returns them, for options declared elsewhere (the models' settings)."""
    name = os.path.basename(script)
    print((doc or '').strip())
    print(f"\nusage: python {name} [CONFIG_FILE ...] [--key=value | --key value ...]   (config files are Python, run"
          f"\n       in order; the overrides apply after every config file, wherever they stand; values are Python"
          f"\n       literals or plain text)\n")
    print("options (default, then what it does):")
    width = max(len(k) for k in config)
    pending, shown = None, set()
    for key, comment in option_comments(script) + list(extra_help):
        if comment is None:
            pending = key  # a heading: printed only if an option follows it
            continue
        if key not in config or key in shown:
            continue
        if pending:
            print(f"  [{pending}]")
            pending = None
        print(f"    --{key:<{width}} = {config[key]!r:<14} {comment}".rstrip())
        shown.add(key)
    for key in config:  # a setting defined outside the commented block still gets a line
        if key not in shown:
            print(f"    --{key:<{width}} = {config[key]!r}")


def configure(config, argv, script=None, doc=None, rules=None, extra_help=()):
    """Apply argv (config files and --key=value) to the dict of defaults `config`, in place, then
    check the rules. With -h or --help in argv, print the help derived from `script` (and
    extra_help, see print_help) and exit 0."""
    if script is not None and any(a in ('-h', '--help') for a in argv):
        try:
            print_help(config, script, doc, extra_help)
        except BrokenPipeError:  # e.g. piped into head
            pass
        sys.exit(0)
    defaults = dict(config)
    known = sorted(config)
    args, i = [], 0
    while i < len(argv):  # --key value is --key=value
        arg = argv[i]
        if arg.startswith('--') and '=' not in arg and len(arg) > 2 and i + 1 < len(argv) \
                and not argv[i + 1].startswith('--'):
            arg, i = f"{arg}={argv[i + 1]}", i + 1
        args.append(arg)
        i += 1
    # config files first, in order, then the overrides: an override wins wherever it stands
    for arg in sorted(args, key=lambda a: a.startswith('--')):
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: {arg} (config files live in config/, e.g. "
                                  f"config/quick_learned.py)")
            try:
                with open(arg, encoding='utf-8') as f:
                    code = f.read()
            except UnicodeDecodeError as e:
                raise ConfigError(f"{arg} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
            except OSError as e:
                raise ConfigError(f"cannot read config file {arg}: {e.strerror or e}") from None
            scope = dict(config)
            try:
                exec(compile(code, arg, 'exec'), {}, scope)
            except SystemExit as e:  # exit code 0 would end the run as if it had succeeded, with nothing done
                raise ConfigError(f"{arg} called exit ({e.code!r}) while it was read: a config file only sets "
                                  f"options; remove the call") from None
            except BaseException as e:  # KeyboardInterrupt and the like too: one line, not a traceback
                raise ConfigError(f"{arg} failed to run: {type(e).__name__}{f': {e}' if str(e) else ''}") from None
            for key, value in scope.items():
                if key.startswith('_') or isinstance(value, types.ModuleType):
                    continue  # private helpers and imports (e.g. math for pi) are not settings
                if key not in config:
                    raise unknown_key(key, known, arg)
                config[key] = check_value(key, value, defaults[key], arg)
        else:
            key, eq, raw = arg[2:].partition('=')
            if not eq or not key:
                example = next(iter(defaults), 'key')
                raise ConfigError(f"malformed argument '{arg}': write --key=value or --key value "
                                  f"(e.g. --{example}={defaults.get(example, 'value')})")
            if key not in config:
                raise unknown_key(key, known, arg)
            try:
                value = ast.literal_eval(raw)
            except (SyntaxError, ValueError):
                value = raw  # a bare string such as --out_dir=out/run1
            if isinstance(defaults[key], str) and value is not None:
                value = raw  # a string setting keeps the text as typed: --wandb_run_name=2024, --shapes=seed,quick
            config[key] = check_value(key, value, defaults[key], arg)
    check_rules(config, rules or {}, defaults)
    return config
