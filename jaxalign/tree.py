"""Small helpers on nested dicts of params (pure dicts) and JAX key paths, shared by every layer.

A leaf module: it imports nothing from jaxalign, so models, lora, convert and checkpoint can all use it.
Parameter paths are "/"-joined pure-dict keys: "layers/q/kernel", "lm_head/kernel".
"""


def keystr(path) -> str:
    """'opt_state/1/0/count': dict keys, sequence indices and namedtuple fields alike (Orbax's metadata
    and the target tree spell them differently)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_get(tree, path):
    """The value at `path` (a sequence of keys) of a nested dict."""
    for p in path:
        tree = tree[p]
    return tree


def tree_set(tree, path, value):
    """Set the value at `path` (a sequence of keys), creating the dicts on the way."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def tree_get_path(tree, path: str):
    """The value at a "/"-joined parameter path."""
    return tree_get(tree, path.split("/"))


def tree_set_path(tree, path: str, value):
    tree_set(tree, path.split("/"), value)


def tree_has_path(tree, path: str) -> bool:
    try:
        tree_get_path(tree, path)
        return True
    except (KeyError, TypeError):
        return False
