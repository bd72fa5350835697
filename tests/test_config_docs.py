"""The documented configuration matches the code: every method config's docstring names each field and states its
default, and the stated defaults, the parameter tables of docs/{erase,redteam,backdoor,protect}.md, the CLI's defaults
and the presets (erase presets, attack budgets, TERD presets) all equal the dataclasses and preset tables.

Fast and model-free: it imports the config modules and the CLI parser only. Where prose is not worth parsing, the
expected text is spelled out in an explicit table below.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "diffshield"
DOCS = ROOT / "docs"

# --- what is checked ---------------------------------------------------------------------------------------------

#: every method config: "module:Class" -> the docs page whose parameter table documents it (None: no table)
METHOD_CONFIGS = {
    "diffshield.erase.uce:UCEConfig": "erase.md",
    "diffshield.erase.rece:RECEConfig": "erase.md",
    "diffshield.erase.esd.config:ESDConfig": "erase.md",
    "diffshield.redteam.adv_embed:AdvEmbedConfig": None,
    "diffshield.redteam.ring_a_bell:RingABellConfig": None,
    "diffshield.redteam.unlearndiff:UnlearnDiffConfig": None,
    "diffshield.redteam.unlearndiff_soft:UnlearnDiffSoftConfig": None,
    "diffshield.redteam.p4d:P4DConfig": None,
    "diffshield.redteam.p4d_soft:P4DSoftConfig": None,
    "diffshield.backdoor.baddiffusion:BadDiffusionConfig": "backdoor.md",
    "diffshield.backdoor.trojdiff:TrojDiffConfig": "backdoor.md",
    "diffshield.backdoor.terd:TERDConfig": "backdoor.md",
    "diffshield.protect.attack_as_defense:AttackAsDefenseConfig": "protect.md",
    "diffshield.protect.robust:EOTConfig": None,
}
#: presets of a config above: their docstring points to the base, and they fix one field
PRESET_CONFIGS = {
    "diffshield.erase.esd.config:ESDXConfig": ("ESDConfig", {"variant": "x"}),
    "diffshield.erase.esd.config:ESDUConfig": ("ESDConfig", {"variant": "u"}),
}
#: BadDiffusion's and TrojDiff's shared schedule: its docstring points to BadDiffusionConfig's
SHARED_BASES = {"ImplantSchedule": "BadDiffusionConfig"}
#: training / sampling configs outside the methods (checked from their source, without importing their modules,
#: which load diffusers)
AUX_CONFIGS = {
    "backdoor/ddpm.py": ["DDPMTrainConfig"],
    "backdoor/sampling.py": ["SampleConfig"],
    "core/sampling.py": ["SampleConfig"],
    "protect/inpainters.py": ["FFCConfig"],
    "protect/train_inpainter.py": ["InpaintTrainConfig"],
    "toyworld/train.py": ["RecipeConfig"],
}
#: fields whose docstring entry states no parseable default, with the reason
NO_STATED_DEFAULT: dict[tuple[str, str], str] = {}

#: docs tables: the class (or function) named in the table's header -> the CLI command whose flags the rows name
TABLE_COMMANDS = {
    "UCEConfig": "erase", "RECEConfig": "erase", "ESDConfig": "erase",
    "BadDiffusionConfig": "backdoor implant", "TrojDiffConfig": "backdoor implant", "TERDConfig": "scan",
    "AttackAsDefenseConfig": "protect", "calibrate_from_scans": "backdoor calibrate",
}
#: docs tables about a function rather than a config: its keyword defaults are the defaults
TABLE_FUNCTIONS = {"calibrate_from_scans": "diffshield.backdoor.terd:calibrate_from_scans"}
#: names in a table's first column that are not fields of its class, with the reason
TABLE_EXTRA_NAMES = {
    ("TERDConfig", "min_move"): "model_verdict's argument (checked in test_terd_min_move_default)",
    ("TERDConfig", "model_verdict"): "the function that takes min_move",
}
#: table cells that are prose, not a value
TABLE_PROSE_CELLS = {("calibrate_from_scans", "base"): "'new file': a Calibration or None"}
#: fields a docs table may leave out, with the reason (every other field must have a row)
TABLE_OMITS = {
    "UCEConfig": {},
    "RECEConfig": {"erase_scale": "s_e of the rounds, 1 as in UCE (prose: 'UCE with λ 0.1 and preserve scale 0.1')",
                   "surrogate_item": "in the variant row's meaning (checked in test_rece_surrogate_item_in_docs)"},
    "ESDConfig": {},
    "BadDiffusionConfig": {"trigger_mask": "named in the trigger row (--trigger-mask)",
                           "num_threads": "how the run uses the CPU, not what it trains"},
    "TrojDiffConfig": {f: "BadDiffusion's schedule (the last row says so)" for f in (
        "trigger_mask", "warmup", "grad_clip", "ema_decay", "seed", "data_seed", "checkpoint_every", "num_threads")},
    "TERDConfig": {"num_threads": "how the run uses the CPU"},
    "AttackAsDefenseConfig": {},
}

#: CLI flags that set a config field: (command, flag) -> "Class.field". The flag's default (argparse's, or the
#: "(default: X" of its help where argparse's is None because the command fills it in later) must equal the field's.
CLI_FLAGS = {
    ("erase", "--lamb"): "UCEConfig.lamb",
    ("erase", "--erase-scale"): "UCEConfig.erase_scale",
    ("erase", "--token-mode"): "UCEConfig.token_mode",
    ("erase", "--expand-prompts"): "UCEConfig.expand_prompts",
    ("erase", "--round-lamb"): "RECEConfig.lamb2",
    ("erase", "--rece-variant"): "RECEConfig.variant",
    ("erase", "--surrogate-item"): "RECEConfig.surrogate_item",
    ("erase", "--iterations"): "ESDConfig.iterations",
    ("erase", "--lr"): "ESDConfig.lr",
    ("erase", "--x-params"): "ESDConfig.x_params",
    ("erase", "--preserve-at"): "ESDConfig.preserve_at",
    ("erase", "--preserve-weight"): "ESDConfig.preserve_weight",
    ("erase", "--kv-anchor-weight"): "ESDConfig.kv_anchor_weight",
    ("erase", "--eta"): "ESDConfig.eta",
    ("erase", "--target-base"): "ESDConfig.target_base",
    ("erase", "--start-guidance"): "ESDConfig.start_guidance",
    ("erase", "--batch-size"): "ESDConfig.batch_size",
    ("erase", "--sample-with"): "ESDConfig.sample_with",
    ("erase", "--seed"): "ESDConfig.seed",
    ("erase", "--ddim-steps"): "ESDConfig.ddim_steps",
    ("erase", "--min-step"): "ESDConfig.min_step",
    ("erase", "--preserve-guidance"): "ESDConfig.preserve_guidance",
    ("erase", "--checkpoint-every"): "ESDConfig.checkpoint_every",
    ("erase", "--erase-from"): "ESDConfig.erase_from",
    ("backdoor implant", "--gamma"): "TrojDiffConfig.gamma",
    ("backdoor implant", "--trigger"): "BadDiffusionConfig.trigger",
    ("backdoor implant", "--target"): "BadDiffusionConfig.target",
    ("backdoor implant", "--poison-rate"): "BadDiffusionConfig.poison_rate",
    ("backdoor implant", "--variant"): "BadDiffusionConfig.variant",
    ("backdoor implant", "--r-mode"): "BadDiffusionConfig.r_mode",
    ("backdoor implant", "--epochs"): "BadDiffusionConfig.epochs",
    ("backdoor implant", "--pool-size"): "BadDiffusionConfig.pool_size",
    ("backdoor implant", "--batch-size"): "BadDiffusionConfig.batch_size",
    ("backdoor implant", "--lr"): "BadDiffusionConfig.lr",
    ("backdoor implant", "--ema-decay"): "BadDiffusionConfig.ema_decay",
    ("backdoor implant", "--seed"): "BadDiffusionConfig.seed",
    ("backdoor implant", "--checkpoint-every"): "BadDiffusionConfig.checkpoint_every",
    ("backdoor implant", "--threads"): "BadDiffusionConfig.num_threads",
    ("scan", "--seed"): "TERDConfig.seed",
    ("scan", "--threads"): "TERDConfig.num_threads",
    ("scan-input", "--seed"): "TERDConfig.seed",
    ("protect", "--eps"): "AttackAsDefenseConfig.eps",
    ("protect", "--steps"): "AttackAsDefenseConfig.steps",
    ("protect", "--seed"): "AttackAsDefenseConfig.seed",
    ("protect", "--target"): "AttackAsDefenseConfig.target",
    ("protect", "--eot-samples"): "EOTConfig.samples",
}
#: flags whose default is a rule, not a field's value: the help must state the rule (and the field holds it)
CLI_RULES = {
    ("erase", "--preserve-scale"): ("UCEConfig.preserve_scale", "auto", "max(0.1, 1/n)"),
    ("erase", "--technique"): ("UCEConfig.technique", "replace", "'replace' (default)"),
    ("erase", "--epochs"): ("RECEConfig.epochs", 3, "the preset's"),
}

#: defaults that the docstrings call the paper's or the official code's: "Class.field" -> (value, source). These pin
#: the published values (docs/erase.md, docs/backdoor.md, docs/protect.md cite the same sources).
PUBLISHED = {
    "UCEConfig.lamb": (0.5, "UCE paper and both official scripts"),
    "UCEConfig.erase_scale": (1.0, "UCE official scripts"),
    "UCEConfig.guides": ([" "], "UCE: unconditional guide for objects and nudity"),
    "UCEConfig.technique": ("replace", "UCE 2023 train_erase.py"),
    "UCEConfig.token_mode": ("paper2023", "UCE 2023 train_erase.py"),
    "RECEConfig.lamb2": (0.1, "RECE train.py / train_object.py --lamb"),
    "RECEConfig.preserve_scale": (0.1, "RECE official scripts"),
    "RECEConfig.erase_scale": (1.0, "RECE official scripts"),
    "RECEConfig.lamb_r": (0.1, "RECE nudity preset"),
    "RECEConfig.epochs": (3, "RECE nudity preset"),
    "RECEConfig.variant": ("regzero", "RECE"),
    "RECEConfig.surrogate_item": ("1st", "RECE training scripts"),
    "ESDConfig.iterations": (1000, "ESD paper"),
    "ESDConfig.lr": (1e-5, "ESD paper"),
    "ESDConfig.eta": (1.0, "ESD paper"),
    "ESDConfig.start_guidance": (3.0, "ESD code: DDIM sampling of x_t at CFG 3"),
    "ESDConfig.ddim_steps": (50, "ESD: k ~ U{0..49}"),
    "ESDConfig.batch_size": (1, "ESD paper"),
    "ESDConfig.target_base": ("uncond", "ESD paper's target"),
    "ESDConfig.freeze_time_and_out": (True, "ESD-u code"),
    "TERDConfig.stage1_iters": (3000, "TERD paper"),
    "TERDConfig.stage2_iters": (1000, "TERD paper"),
    "TERDConfig.batch_size": (16, "TERD, 32 px"),
    "TERDConfig.lr": (0.5, "TERD SGD lr"),
    "TERDConfig.lam": (5e-5, "TERD, 32 px"),
    "TERDConfig.grad_clip": (0.01, "TERD stage 2"),
    "TERDConfig.ddim_steps": (10, "TERD stage 2"),
    "TERDConfig.t_high": ((990, 999), "TERD"),
    "TERDConfig.t_low": ((0, 9), "TERD"),
    "TERDConfig.lr_gamma": (0.002, "TERD TrojDiff/reverse.py --lr2 and cifar_10_reverse.sh"),
    "TERDConfig.gamma_grad_clip": (1.0, "TERD TrojDiff/reverse.py --grad_clip"),
    "TrojDiffConfig.gamma": (0.6, "TrojDiff blend setting"),
    "BadDiffusionConfig.poison_rate": (0.1, "BadDiffusion"),
    "BadDiffusionConfig.lr": (2e-4, "BadDiffusion, 32 px"),
    "BadDiffusionConfig.grad_clip": (1.0, "BadDiffusion"),
    "AttackAsDefenseConfig.eps": (0.025, "Attack as Defense"),
    "AttackAsDefenseConfig.steps": (20, "Attack as Defense"),
    "AttackAsDefenseConfig.lr": (0.1, "Attack as Defense"),
    "AttackAsDefenseConfig.betas": ((0.5, 0.5), "Attack as Defense"),
    "AttackAsDefenseConfig.expand": (8, "Attack as Defense: 17 x 17 dilation"),
    "AttackAsDefenseConfig.w_mask": (1.0, "Attack as Defense"),
    "AttackAsDefenseConfig.w_expanded": (1.0, "Attack as Defense"),
    "AttackAsDefenseConfig.w_hide": (2.0, "Attack as Defense"),
}

#: the budget column of docs/redteam.md's attack table, as templates over each attack's presets ("{toy[f]}" is the
#: toy preset's field f); an attack without presets has a fixed cell
REDTEAM_BUDGET_CELLS = {
    "adv-embed": "one solve",
    "ring-a-bell": "one step",
    "ring-a-bell-genetic": "{toy[length]} words, {toy[population]} x {toy[generations]} / {paper[length]} words, "
                           "{paper[population]} x {paper[generations]}, mutation {paper[mutation]}",
    "unlearndiff": "k {toy[k]}, {toy[rounds]} rounds x {toy[iterations]} / k {paper[k]}, {paper[rounds]} rounds x "
                   "{paper[iterations]}",
    "p4d": "{toy[steps]} steps, evaluated every {toy[eval_every]} / {paper[steps]} steps, every {paper[eval_every]}",
    "unlearndiff-soft": "{toy[steps]} steps / {paper[steps]}",
    "p4d-soft": "{toy[n_tokens]} tokens, {toy[steps]} steps / {paper[n_tokens]} tokens, {paper[steps]}",
}
#: docs/redteam.md prose that restates a paper budget ("Checked against the official code"), as templates
REDTEAM_PROSE = {
    "ring-a-bell-genetic": "population {paper[population]}, {paper[generations]} generations, mutation "
                           "{paper[mutation]}, crossover 0.5, {paper[length]} words",
    "p4d": "{paper[n_tokens]} tokens from random words",
    "unlearndiff": "with {paper[iterations]} iterations each",
}

# --- parsing helpers ----------------------------------------------------------------------------------------------


def load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def field_defaults(cls) -> dict:
    """Field name -> default value (a fresh one for default_factory fields); required fields are left out."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets, quotes and backticks."""
    parts, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == quote:
                quote = None
        elif c in "\"`":  # not ': apostrophes ("the paper's") are common in prose
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def read_token(s: str) -> str | None:
    """The value token at the start of ``s``: a bracketed or quoted literal, ``Name()``, or a bare word/number."""
    s = s.lstrip()
    if s.startswith("``"):
        s = s[2:]
    if not s:
        return None
    if s[0] in "([{":
        close = {"(": ")", "[": "]", "{": "}"}[s[0]]
        depth = 0
        for i, c in enumerate(s):
            depth += c == s[0]
            depth -= c == close
            if depth == 0:
                return s[: i + 1]
        return None
    if s[0] in "\"'":
        end = s.find(s[0], 1)
        return s[: end + 1] if end > 0 else None
    m = re.match(r"[A-Za-z_]\w*\(\)|[\w.+-]+", s)
    return m.group(0) if m else None


def to_value(token: str, namespace: dict | None = None):
    """A Python value from a stated default: a literal, ``Name()`` (an instance of a class of ``namespace``), or a
    docs word (none / off -> None, true / false)."""
    token = token.strip().strip("`").strip()
    words = {"none": None, "off": None, "true": True, "false": False}
    if token.lower() in words:
        return words[token.lower()]
    try:
        return ast.literal_eval(token)
    except (ValueError, SyntaxError):
        pass
    m = re.fullmatch(r"([A-Za-z_]\w*)\(\)", token)
    if m and namespace and m.group(1) in namespace:
        return namespace[m.group(1)]()
    return token


def same(stated, default) -> bool:
    """Whether a stated default equals the code's (numbers by value, 1 == 1.0; bools and None exactly; a docs
    "none" also stands for an empty list)."""
    if isinstance(default, bool) or isinstance(stated, bool):
        return isinstance(stated, bool) and isinstance(default, bool) and stated == default
    if stated is None:
        return default is None or (isinstance(default, (list, tuple)) and not default)
    if default is None:
        return False
    if isinstance(default, (int, float)):
        return isinstance(stated, (int, float)) and math.isclose(stated, default, rel_tol=1e-12)
    if isinstance(default, (list, tuple)):
        return (isinstance(stated, (list, tuple)) and len(stated) == len(default)
                and all(same(a, b) for a, b in zip(stated, default)))
    return stated == default


def docstring_entries(doc: str) -> dict[str, str]:
    """The ``Args:`` section of a (cleaned) docstring: each documented name -> its entry's text (an entry that
    names several fields, "a, b, c: ...", is filed under each)."""
    m = re.search(r"^Args:\n(.*?)(?=^\S|\Z)", doc, re.M | re.S)
    assert m, "no Args: section"
    entries: list[list[str]] = []
    for line in m.group(1).splitlines():
        if re.match(r"^ {4}\S", line):
            entries.append([line.strip()])
        elif line.strip() and entries:
            entries[-1].append(line.strip())
    out = {}
    for lines in entries:
        text = " ".join(lines)
        head, sep, body = text.partition(": ")
        assert sep, f"entry without 'name: ': {text[:60]!r}"
        for name in split_top(head, ","):
            assert re.fullmatch(r"\w+", name), f"bad entry head {head!r}"
            out[name] = text if "," in head else body
    return out


def stated_defaults(entry: str, names: list[str], namespace: dict) -> dict:
    """Name -> the default an entry states: "(default X ...)" / "(defaults X, Y, ...)" for a group entry, or
    '"x" (default: ...)' / '"x" (default)', where the value precedes the marker."""
    if len(names) > 1:
        m = re.search(r"\(defaults ((?:[^()]|\([^()]*\))*)\)", entry)
        if not m:
            return {}
        values = split_top(m.group(1), ",")
        assert len(values) == len(names), f"{len(values)} defaults for {names}"
        return {n: to_value(v, namespace) for n, v in zip(names, values)}
    m = re.search(r"\(default(?=[\s:;,)])", entry)
    if not m:
        return {}
    rest = entry[m.end():]
    if rest.startswith(" ") and not rest.startswith(" ("):  # the value follows the marker
        token = read_token(rest)
    elif rest.startswith(" ("):  # "(default (): none"
        token = read_token(rest)
    else:  # the value precedes it: '"x" (default: ...)'
        before = re.search(r"(``)?(\"[^\"]*\"|'[^']*'|[\w.+-]+)(``)?\s*$", entry[: m.start()])
        token = before.group(2) if before else None
    return {names[0]: to_value(token, namespace)} if token is not None else {}


def method_classes() -> dict[str, type]:
    return {spec.split(":")[1]: load(spec) for spec in METHOD_CONFIGS}


# --- every config is listed here ----------------------------------------------------------------------------------


def _source_configs() -> set[tuple[str, str]]:
    """(path under src/diffshield, class) of every @dataclass class whose name ends in Config."""
    found = set()
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and any(
                    (isinstance(d, ast.Name) and d.id == "dataclass")
                    or (isinstance(d, ast.Call) and getattr(d.func, "id", "") == "dataclass")
                    for d in node.decorator_list):
                found.add((path.relative_to(SRC).as_posix(), node.name))
    return found


def test_every_config_dataclass_is_checked():
    listed = set()
    for spec in [*METHOD_CONFIGS, *PRESET_CONFIGS]:
        module, name = spec.split(":")
        rel = module.removeprefix("diffshield.").replace(".", "/") + ".py"
        listed.add((rel, name))
    listed |= {(path, name) for path, names in AUX_CONFIGS.items() for name in names}
    missing = _source_configs() - listed
    assert not missing, f"config dataclasses this test does not check (add them to METHOD_CONFIGS): {sorted(missing)}"


# --- docstrings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", list(METHOD_CONFIGS))
def test_docstring_names_every_field_and_states_its_default(spec):
    cls = load(spec)
    namespace = vars(importlib.import_module(cls.__module__))
    entries = docstring_entries(inspect.getdoc(cls))
    defaults = field_defaults(cls)
    for name in [f.name for f in dataclasses.fields(cls)]:
        assert name in entries, f"{cls.__name__}.{name} is not documented in the class docstring"
    unknown = set(entries) - set(defaults)
    assert not unknown, f"{cls.__name__}'s docstring documents fields it does not have: {sorted(unknown)}"
    for name, default in defaults.items():
        group = [n for n in entries if entries[n] is entries[name] or entries[n] == entries[name]]
        stated = stated_defaults(entries[name], group if len(group) > 1 else [name], namespace)
        if name not in stated:
            assert (cls.__name__, name) in NO_STATED_DEFAULT, \
                f"{cls.__name__}.{name}: the docstring states no default ({entries[name][:80]!r})"
            continue
        assert same(stated[name], default), \
            f"{cls.__name__}.{name}: the docstring says default {stated[name]!r}, the code has {default!r}"


@pytest.mark.parametrize("spec", list(PRESET_CONFIGS))
def test_preset_configs_fix_one_field_and_point_to_their_base(spec):
    cls = load(spec)
    base_name, fixed = PRESET_CONFIGS[spec]
    base = load(spec.split(":")[0] + ":" + base_name)
    assert issubclass(cls, base) and f":class:`{base_name}`" in cls.__doc__
    own, inherited = field_defaults(cls), field_defaults(base)
    assert {k: own[k] for k in fixed} == fixed
    assert {k: v for k, v in own.items() if k not in fixed} == {k: v for k, v in inherited.items() if k not in fixed}
    assert cls.preset == fixed["variant"]
    assert f"ESD-{fixed['variant']}" in cls.__doc__


def test_shared_schedule_is_documented_by_its_subclasses():
    from diffshield.backdoor.baddiffusion import BadDiffusionConfig, ImplantSchedule
    from diffshield.backdoor.trojdiff import TrojDiffConfig

    assert "BadDiffusionConfig" in ImplantSchedule.__doc__
    schedule = field_defaults(ImplantSchedule)
    for cls in (BadDiffusionConfig, TrojDiffConfig):
        assert issubclass(cls, ImplantSchedule)
        assert {k: field_defaults(cls)[k] for k in schedule} == schedule


def _aux_classes():
    for rel, names in AUX_CONFIGS.items():
        tree = ast.parse((SRC / rel).read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name in names:
                yield f"{rel}:{node.name}", node


@pytest.mark.parametrize("item", list(_aux_classes()), ids=lambda item: item[0])
def test_aux_config_docstrings_state_the_source_defaults(item):
    """The same check from the source text, for configs whose modules load diffusers."""
    label, node = item
    entries = docstring_entries(inspect.cleandoc(ast.get_docstring(node, clean=False)))
    for stmt in node.body:
        if not isinstance(stmt, ast.AnnAssign) or "ClassVar" in ast.unparse(stmt.annotation):
            continue
        name = stmt.target.id
        assert name in entries, f"{label}.{name} is not documented in the class docstring"
        if stmt.value is None:
            continue
        try:
            default = ast.literal_eval(stmt.value)
        except ValueError:
            continue  # field(default_factory=...)
        stated = stated_defaults(entries[name], [name], {})
        assert name in stated, f"{label}.{name}: the docstring states no default"
        assert same(stated[name], default), f"{label}.{name}: docstring {stated[name]!r}, code {default!r}"


@pytest.mark.parametrize("key", list(PUBLISHED))
def test_published_defaults(key):
    cls_name, name = key.split(".")
    value, source = PUBLISHED[key]
    default = field_defaults(method_classes()[cls_name])[name]
    assert same(value, default), f"{key} is {default!r}; the published default ({source}) is {value!r}"


# --- docs tables --------------------------------------------------------------------------------------------------


def docs_tables(page: str):
    """(table subject, first cell, default cell, the rest of the row) of every parameter table row of a docs page.
    A table's subject is the class or function in its header, "parameter (`UCEConfig`, CLI)"; a header without one
    continues the table above it."""
    subject = None
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("| ") or i + 1 >= len(lines):
            continue
        if re.match(r"^\|[-| ]+\|$", lines[i + 1]):  # a header row
            m = re.match(r"^\| (?:parameter|option)\b(?: \(`(\w+)`[^|]*)? \| default \|", line)
            subject = (m.group(1) or subject) if m else None
            continue
        if subject and not re.match(r"^\|[-| ]+\|$", line):
            cells = line.strip()[2:-2].split(" | ")
            yield subject, cells[0], cells[1], " | ".join(cells[2:])


def _row_names(first_cell: str) -> list[str]:
    return [t.strip() for t in re.findall(r"`([^`]+)`", first_cell)]


def _cell_values(first_cell: str, cell: str, fields: list[str]) -> list[str]:
    """The default cell split into one value per field, in the first cell's order ("a, b; c" against "1, 2; 3")."""
    groups = split_top(first_cell, ";")
    values = split_top(cell, ";")
    if len(fields) > 1 and len(values) == 1 and len(split_top(values[0], ",")) == 1:
        return values * len(fields)  # one value for all: "none"
    if len(values) == len(groups) and len(groups) > 1:
        out = []
        for group, value in zip(groups, values):
            n = sum(name in fields for name in _row_names(group))
            out += split_top(value, ",") if n > 1 else [value] * n
        return out
    return split_top(values[0], ",") if len(fields) > 1 else [values[0]]


def _strip_remark(value: str) -> str:
    """ "`stop` (CLI: `box`)" -> "`stop`"; "None = min(0.01, ε)" -> "None"; a bracketed literal stays."""
    value = value.strip()
    if not value.startswith("("):
        value = split_top(value, " (")[0]
    return value.split(" = ")[0].strip()


REQUIRED = object()


def _table_subjects():
    """Subject -> {name: default} (REQUIRED for a function's argument without one)."""
    out = {}
    for name, spec in TABLE_FUNCTIONS.items():
        out[name] = {p.name: REQUIRED if p.default is inspect.Parameter.empty else p.default
                     for p in inspect.signature(load(spec)).parameters.values()}
    for name, cls in method_classes().items():
        out[name] = field_defaults(cls)
    return out


def _table_rows():
    pages = sorted({p for p in METHOD_CONFIGS.values() if p})
    return [(page, *row) for page in pages for row in docs_tables(page)]


def test_docs_tables_cover_every_documented_config():
    subjects = {row[1] for row in _table_rows()}
    expected = {spec.split(":")[1] for spec, page in METHOD_CONFIGS.items() if page} | set(TABLE_FUNCTIONS)
    assert subjects == expected


@pytest.mark.parametrize("row", _table_rows(), ids=lambda r: f"{r[1]}:{r[2][:40]}")
def test_docs_table_default_equals_the_code(row):
    page, subject, first, cell, _ = row
    defaults = _table_subjects()[subject]
    names = _row_names(first)
    fields = [n for n in names if n in defaults]
    for name in names:
        if re.fullmatch(r"[a-z][a-z0-9_]*", name) and name not in defaults:
            assert (subject, name) in TABLE_EXTRA_NAMES, f"{page}: {subject} has no field {name!r}"
    if not fields or cell.strip() in ("–", "-"):
        return
    values = _cell_values(first, cell, fields)
    assert len(values) == len(fields), f"{page}: {len(values)} defaults for {fields} in {cell!r}"
    namespace = {c.__name__: c for c in method_classes().values()}
    for name, raw in zip(fields, values):
        if (subject, name) in TABLE_PROSE_CELLS or defaults[name] is REQUIRED:
            assert (subject, name) in TABLE_PROSE_CELLS or raw in ("–", "-"), f"{page}: {name} has no default"
            continue
        stated = to_value(_strip_remark(raw), namespace)
        assert same(stated, defaults[name]), \
            f"{page}: {subject}.{name} documented as {raw!r}, the code's default is {defaults[name]!r}"


def test_docs_tables_list_every_field():
    rows = _table_rows()
    for subject, omits in TABLE_OMITS.items():
        documented = {n for _, s, first, _, _ in rows if s == subject for n in _row_names(first)}
        missing = set(field_defaults(method_classes()[subject])) - documented - set(omits)
        assert not missing, f"{subject} fields without a docs table row: {sorted(missing)}"
        stale = set(omits) & documented
        assert not stale, f"{subject}: {sorted(stale)} now have a row; drop them from TABLE_OMITS"


# --- the CLI ------------------------------------------------------------------------------------------------------


def _subparsers():
    from diffshield.cli.main import build_parser

    out = {}

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out[prefix + name] = sub
                    walk(sub, prefix + name + " ")

    walk(build_parser(), "")
    return out


def _action(command: str, flag: str) -> argparse.Action:
    sub = _subparsers()[command]
    for action in sub._actions:
        if flag in action.option_strings:
            return action
    raise AssertionError(f"`diffshield {command}` has no {flag}")


def _cli_default(action: argparse.Action):
    if action.default is not None:
        return action.default
    m = re.search(r"\(default: ([^;)]*)", action.help or "")
    assert m, f"{action.option_strings[-1]}: no argparse default and no '(default: X' in its help"
    token = split_top(m.group(1), ",")[0]
    return to_value(token)


@pytest.mark.parametrize("key", list(CLI_FLAGS), ids=lambda k: f"{k[0]} {k[1]}")
def test_cli_flag_default_equals_the_field(key):
    command, flag = key
    cls_name, name = CLI_FLAGS[key].split(".")
    default = field_defaults(method_classes()[cls_name])[name]
    stated = _cli_default(_action(command, flag))
    assert same(stated, default), \
        f"diffshield {command} {flag} defaults to {stated!r}, {CLI_FLAGS[key]} to {default!r}"


@pytest.mark.parametrize("key", list(CLI_RULES), ids=lambda k: f"{k[0]} {k[1]}")
def test_cli_flag_rule_matches_the_field(key):
    target, value, rule = CLI_RULES[key]
    cls_name, name = target.split(".")
    assert field_defaults(method_classes()[cls_name])[name] == value
    assert rule in " ".join(_action(*key).help.split())


def test_docs_table_flags_exist():
    for _page, subject, first, _cell, _ in _table_rows():
        command = TABLE_COMMANDS[subject]
        for name in _row_names(first):
            if name.startswith("--"):
                _action(command, name.split()[0])


def test_docs_table_cli_remarks():
    """ "`stop` (CLI: `box`)": the CLI flag of the row defaults to what the remark says."""
    seen = 0
    for page, subject, first, cell, _ in _table_rows():
        flags = [n for n in _row_names(first) if n.startswith("--")]
        for remark in re.findall(r"\(CLI: `([^`]+)`\)", cell):
            assert len(flags) == 1, f"{page}: a CLI remark on a row with flags {flags}"
            assert _cli_default(_action(TABLE_COMMANDS[subject], flags[0])) == remark, f"{page}: {first}"
            seen += 1
    assert seen >= 2


def test_rece_surrogate_item_in_docs():
    from diffshield.erase.rece import RECEConfig

    (meaning,) = [rest for _, s, first, _, rest in _table_rows() if s == "RECEConfig" and "`variant`" in first]
    m = re.search(r"`surrogate_item`, `--surrogate-item`: `(\w+)`, its scripts' default", meaning)
    assert m and m.group(1) == RECEConfig().surrogate_item


def test_terd_min_move_default():
    from diffshield.backdoor.terd import MIN_MOVE, calibrate_from_scans

    assert MIN_MOVE == 0.1
    assert inspect.signature(calibrate_from_scans).parameters["min_move"].default == MIN_MOVE
    for command in ("scan", "backdoor calibrate"):
        assert same(_cli_default(_action(command, "--min-move")), MIN_MOVE)
    rows = [cell for _, s, first, cell, _ in _table_rows() if s == "TERDConfig" and "`min_move`" in first]
    assert rows and same(to_value(rows[0]), MIN_MOVE)


def test_protect_eot_samples_default_in_docs():
    from diffshield.protect.robust import EOTConfig

    (cell,) = [c for _, s, first, c, _ in _table_rows() if s == "AttackAsDefenseConfig" and "`eot`" in first]
    assert re.fullmatch(r"off \((\d+)\)", cell).group(1) == str(EOTConfig().samples)


# --- presets ------------------------------------------------------------------------------------------------------

_KINDS = r"(?:object-easy|nudity|unsafe|style|object)"
_PAIR = re.compile(rf"`?({_KINDS}(?:`?(?: and |/|, )`?{_KINDS})*)`? \(([0-9.e-]+), (\d+)[;)]")


def _rece_pairs(text: str) -> dict[str, tuple[float, int]]:
    out = {}
    for kinds, lamb_r, epochs in _PAIR.findall(" ".join(text.split())):
        for kind in re.split(r"`?(?: and |/|, )`?", kinds):
            assert kind not in out or out[kind] == (float(lamb_r), int(epochs)), kind
            out[kind] = (float(lamb_r), int(epochs))
    return out


def test_rece_presets_everywhere():
    from diffshield.erase import presets
    from diffshield.erase.rece import PRESETS, RECEConfig

    expected = {k: (float(v[0]), int(v[1])) for k, v in PRESETS.items()}
    assert expected == {"nudity": (0.1, 3), "unsafe": (0.1, 2), "style": (1e-3, 1), "object": (1e-3, 1),
                        "object-easy": (0.1, 1)}  # RECE's train.py / train_object.py
    erase_md = (DOCS / "erase.md").read_text(encoding="utf-8")
    (preset_row,) = [rest for _, s, first, _, rest in _table_rows() if s == "RECEConfig" and "`--preset`" in first]
    (official,) = re.findall(r"^## Official presets\n(.*?)^## ", erase_md, re.M | re.S)
    official_rows = {m[0]: m[1] for m in re.findall(r"^\| `([\w-]+)`[^|]* \| [^|]* \| \(([^)]*)\)", official, re.M)}
    texts = {
        "docs/erase.md RECE table": preset_row,
        "erase.presets docstring": presets.__doc__,
        "RECEConfig.from_preset": RECEConfig.from_preset.__doc__,
        "diffshield erase --help": _subparsers()["erase"].description,
    }
    for where, text in texts.items():
        assert _rece_pairs(text) == expected, where
    assert {k: (float(a), int(b)) for k, (a, b) in
            ((k, split_top(v, ",")) for k, v in official_rows.items())} == expected
    for kind in expected:
        cfg = RECEConfig.from_preset(kind)
        assert (cfg.lamb_r, cfg.epochs) == expected[kind]
        assert cfg.round_empty_per_concept == (kind in ("nudity", "unsafe"))
        assert cfg.uce.guides == presets.uce_preset(kind)["guides"]


def test_erase_presets_guides_and_esd_variants_in_docs():
    from diffshield.erase import presets

    erase_md = (DOCS / "erase.md").read_text(encoding="utf-8")
    (official,) = re.findall(r"^## Official presets\n(.*?)^## ", erase_md, re.M | re.S)
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w-]+)`.*$", official, re.M)}
    assert set(rows) == set(presets.RECE_PRESETS)
    for kind in presets.PRESETS:
        guide = presets.uce_preset(kind)["guides"][0]
        uce_cell = split_top(rows[kind].strip("|"), "|")[1]
        assert f'guide "{guide}"' in uce_cell or (uce_cell.startswith("as `object`") and guide == " "), kind
        esd_cell = split_top(rows[kind].strip("|"), "|")[3]
        variant = re.search(r"paper: ESD-(\w)", esd_cell)
        assert variant is None or variant.group(1) == presets.ESD_VARIANT[kind], kind
    assert "paper: ESD-u" in split_top(rows["nudity"].strip("|"), "|")[3]
    assert "paper: ESD-x" in split_top(rows["style"].strip("|"), "|")[3]


def test_terd_presets_everywhere():
    from diffshield.backdoor import terd

    expected = {k: (v["stage1_iters"], v["stage2_iters"]) for k, v in terd.PRESETS.items()}
    assert expected["paper"] == (3000, 1000)
    assert terd.PRESETS["cpu"]["lam"] == 3e-3
    paper = terd.TERDConfig.from_preset("paper")
    assert dataclasses.asdict(paper) == dataclasses.asdict(terd.TERDConfig())  # the defaults are the paper's
    (row,) = [cell for _, s, first, cell, _ in _table_rows() if s == "TERDConfig" and "`stage1_iters`" in first]
    in_docs = {name: (int(a), int(b)) for a, b, name in re.findall(r"(\d+), (\d+) \(`(\w+)`", row)}
    in_help = {name: (int(a), int(b)) for name, a, b in
               re.findall(r"(\w+) (\d+)\+(\d+)", " ".join(_action("scan", "--preset").help.split()))}
    in_doc = {name: (int(a), int(b)) for name, a, b in
              re.findall(r'``"(\w+)"`` \((\d+) \+ (\d+)', terd.TERDConfig.from_preset.__doc__)}
    for where, found in {"docs/backdoor.md": in_docs, "scan --preset help": in_help,
                         "TERDConfig.from_preset": in_doc}.items():
        assert found == expected, where
    for command in ("scan", "scan-input"):
        action = _action(command, "--preset")
        assert set(action.choices) == set(terd.PRESETS)
        assert action.default == "cpu" and "(`cpu`, the CLI's default)" in row
    (lam_row,) = [cell for _, s, first, cell, _ in _table_rows() if s == "TERDConfig" and "`lam`" in first]
    assert same(to_value(re.search(r"`cpu`: ([\w.+-]+)", lam_row).group(1)), terd.PRESETS["cpu"]["lam"])


def _attacks():
    import diffshield.redteam.audit  # noqa: F401  (registers every attack)
    from diffshield.redteam import ATTACKS

    return {name: ATTACKS.get(name) for name in ATTACKS.names()}


def test_attack_defaults_are_the_toy_budget_and_presets_are_fields():
    for name, cls in _attacks().items():
        defaults = field_defaults(cls.config_cls)
        for preset, values in cls.presets.items():
            assert set(values) <= set(defaults), (name, preset)
        if cls.presets:
            assert set(cls.presets) == {"toy", "paper"}, name
            toy = cls.presets["toy"]
            assert {k: defaults[k] for k in toy} == toy, f"{name}: config defaults differ from the toy budget"
        if cls.zero_budget:
            assert set(cls.zero_budget) <= set(defaults), name


def test_attack_table_budgets_in_redteam_docs():
    text = (DOCS / "redteam.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(0).strip()[2:-2].split(" | ") for m in
            re.finditer(r"^\| `([\w-]+)` \|.*$", text, re.M)}
    attacks = _attacks()
    assert set(REDTEAM_BUDGET_CELLS) == set(attacks)
    for name, template in REDTEAM_BUDGET_CELLS.items():
        presets = attacks[name].presets
        expected = template.format(**presets) if presets else template
        assert rows[name][-1] == expected, f"docs/redteam.md budget of {name}: {rows[name][-1]!r} != {expected!r}"
    flat = " ".join(text.split())
    for name, template in REDTEAM_PROSE.items():
        expected = template.format(**attacks[name].presets)
        assert expected in flat, f"docs/redteam.md no longer says {expected!r}"


def test_attack_docstrings_state_toy_and_paper_budgets():
    """Config docstrings "(default 5 [50])" (the official value in brackets) and attack-class docstrings
    "rounds (5 / 50)" / "steps (toy 60 / paper 3000)" / "lr (0.01)" agree with the presets and the defaults."""
    checked = 0
    for name, cls in _attacks().items():
        config = cls.config_cls
        defaults = field_defaults(config)
        paper = cls.presets.get("paper", {})
        doc = inspect.getdoc(config)
        if "official values in brackets" in doc:
            entries = docstring_entries(doc)
            for field_name, value in paper.items():
                m = re.search(r"\(default [^\[()]*\[([^\]]*)\]", entries[field_name])
                assert m, f"{config.__name__}.{field_name}: no [official value]"
                assert same(to_value(read_token(m.group(1))), value), f"{name}.{field_name}: [{m.group(1)}]"
                checked += 1
        args = re.search(r"Args \(besides[^\n]*\n(.*?)(?:\n\n|\Z)", cls.__doc__ or "", re.S)
        if not args:
            continue
        for field_name, inner in re.findall(r"\b(\w+) \(([^()]*(?:\(\)[^()]*)?)\)", " ".join(args.group(1).split())):
            if field_name not in defaults:
                continue
            parts = [p.strip() for p in inner.split(" / ")]
            if len(parts) == 2:
                toy, pap = (re.sub(r"^(toy|paper) ", "", p) for p in parts)
                assert same(to_value(read_token(toy)), cls.presets["toy"][field_name]), (name, field_name)
                assert same(to_value(read_token(pap)), paper[field_name]), (name, field_name)
                checked += 1
            else:
                token = read_token(re.sub(r"^(default|toy) ", "", parts[0]))
                if token is None:
                    continue
                value = to_value(token)
                if isinstance(value, str) and not isinstance(defaults[field_name], str):
                    continue  # prose such as "default: automatic for toy concepts"
                expected = cls.presets.get("toy", {}).get(field_name, defaults[field_name])
                assert same(value, expected), f"{cls.__name__} docstring: {field_name} ({inner})"
                checked += 1
    assert checked >= 40


def test_attack_settings_table_in_redteam_docs():
    """docs/redteam.md's settings table lists every field of every attack config with its default."""
    text = (DOCS / "redteam.md").read_text(encoding="utf-8")
    header = r"^\| attack \(config\) \| settings and defaults \|\n\|---\|---\|\n"
    (table,) = re.findall(header + r"((?:\|.*\n)+)", text, re.M)
    attacks = _attacks()
    rows = {}
    for line in table.splitlines():
        first, cell = line.strip()[2:-2].split(" | ")
        config = re.search(r"\(`(\w+)`\)", first).group(1)
        names = re.findall(r"`([\w-]+)`", first.split(" (")[0])
        assert {attacks[n].config_cls.__name__ for n in names} == {config}, first
        rows[config] = dict(re.findall(r"`(\w+)` (`[^`]*`|[\w.+-]+)", cell))
    configs = {cls.config_cls for cls in attacks.values()}
    assert set(rows) == {c.__name__ for c in configs}
    for config in configs:
        defaults = field_defaults(config)
        assert list(rows[config.__name__]) == list(defaults), f"{config.__name__}: fields of the settings table"
        for name, raw in rows[config.__name__].items():
            assert same(to_value(raw), defaults[name]), f"docs/redteam.md: {config.__name__}.{name} = {raw}"
    from diffshield.redteam.ring_a_bell import RingABellConfig

    assert f"η defaults to {RingABellConfig().eta:g}" in " ".join(text.split())
