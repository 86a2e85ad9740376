"""Idea categories of a coding agent's experiment, from its diff and its own description.

The published figure "which ideas paid off" needs every experiment in a category (lab.CATEGORIES). Built-in
policies know theirs (the category of the parameter they changed). For a coding agent, `classify` looks at
what the submitted commit changed against the best commit:

1. train.py's module-level constants that changed: a constant declared in `[params]` has its category; an
   undeclared one is placed by its name (LR -> learning rate, N_LAYER -> depth, ...: `NAME_HINTS`); the
   lab's `[categories]` table (constant name -> category) overrides both. One category among the changed
   constants is the experiment's; several make it `multiple`.
2. Any other change to train.py's code (the AST differs once constants are set aside) is `architecture`,
   whatever constants changed with it; a change to another file (or one that does not parse) is `other`.
3. When the diff alone says `other` or `architecture` (ambiguous), the agent's description may name the idea
   ("lower the learning rate", "add dropout"): the first category whose words it contains wins; the lab's
   `[categories]` keys match there too.

The category is recorded on `experiment.started` and never re-derived on replay.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from rloopd.agents.random_search import current_constants

NAME_HINTS: list[tuple[str, str]] = [  # (regex on an upper-case constant name, category), first match wins
    (r"(^|_)(LR|LEARNING_RATE|ETA)($|_)", "learning rate"),
    (r"WARMUP|DECAY_STEPS|SCHEDULE|COOLDOWN|COSINE|MIN_LR|ANNEAL", "schedule"),
    (r"DROPOUT|WEIGHT_DECAY|WD($|_)|LABEL_SMOOTH|CLIP", "regularization"),
    (r"BETA|MOMENTUM|EPS($|ILON)|OPTIM|ADAM|MUON|NESTEROV", "optimizer"),
    (r"(^|_)(DEPTH|N_LAYERS?|NUM_LAYERS|LAYERS|N_BLOCKS?)($|_)", "depth"),
    (r"(^|_)(WIDTH|N_EMBD|D_MODEL|HIDDEN|DIM|N_HEADS?|HEADS|MLP_RATIO)($|_)", "width"),
    (r"BATCH", "batch size"),
    (r"CONTEXT|SEQ_LEN|BLOCK_SIZE|CTX", "context"),
]
WORD_HINTS: list[tuple[str, str]] = [  # (regex on the agent's description, category)
    (r"learning.?rate|\blr\b", "learning rate"),
    (r"warm.?up|schedul|cosine|decay|anneal", "schedule"),
    (r"dropout|weight.?decay|regulari[sz]|label.?smooth|clip", "regularization"),
    (r"optimi[sz]er|adam|muon|momentum|beta", "optimizer"),
    (r"\bdepth\b|layers?\b|deeper|shallower", "depth"),
    (r"width|wider|narrower|hidden size|embedding dim|heads?\b", "width"),
    (r"batch.?size|bigger batch|smaller batch", "batch size"),
    (r"context|sequence length|seq.?len", "context"),
    (r"architecture|attention|activation|normali[sz]ation|residual|block", "architecture"),
]


def category_of_constant(name: str, params: dict[str, Any], overrides: dict[str, str]) -> str:
    if name in overrides:
        return overrides[name]
    if name in params:
        return params[name].category
    upper = name.upper()
    for pattern, category in NAME_HINTS:
        if re.search(pattern, upper):
            return category
    return "other"


def from_description(description: str, overrides: dict[str, str]) -> str | None:
    text = description.lower()
    for key, category in overrides.items():
        if key.lower() in text:
            return category
    for pattern, category in WORD_HINTS:
        if re.search(pattern, text):
            return category
    return None


def _without_constants(source: str) -> str:
    """train.py's AST with the values of module-level constants blanked: what is left is its code."""
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            try:
                ast.literal_eval(node.value)
            except ValueError:
                continue
            node.value = ast.Constant(None)
    return ast.dump(tree, include_attributes=False)


def classify(files_before: dict[str, bytes], files_after: dict[str, bytes], description: str,
             params: dict[str, Any], overrides: dict[str, str] | None = None,
             train_file: str = "train.py") -> str:
    """The experiment's category from the workspace files before and after (paths relative to workspace/)."""
    overrides = overrides or {}
    changed = sorted(p for p in set(files_before) | set(files_after) if files_before.get(p) != files_after.get(p))
    if not changed:
        return from_description(description, overrides) or "other"
    if changed != [train_file]:
        by_words = from_description(description, overrides)
        return by_words or "other"
    try:
        old = files_before.get(train_file, b"").decode()
        new = files_after.get(train_file, b"").decode()
        structural = _without_constants(old) != _without_constants(new)
        before, after = current_constants(old), current_constants(new)
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return from_description(description, overrides) or "other"
    names = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
    if structural:  # the code itself changed: that is the idea, whatever constants moved with it
        return "architecture"
    kinds = {category_of_constant(n, params, overrides) for n in names}
    if len(kinds) == 1:
        kind = kinds.pop()
        return kind if kind != "other" else (from_description(description, overrides) or "other")
    return "multiple"
