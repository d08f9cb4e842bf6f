"""Where in the file a config error is: ``routes.yaml:12: models.m.targets[1].provider:
…``, the line of the key or item its path names, read from the YAML's node tree. An
error whose path the file does not have (a missing key, a whole-file check) keeps the
file's name alone."""

from __future__ import annotations

import yaml


def located(errors: list[str], text: str, name: str) -> list[str]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return [f"{name}: {error}" for error in errors]
    out = []
    for error in errors:
        path = error.partition(": ")[0]
        line = line_of(root, path) if root is not None else None
        out.append(f"{name}:{line}: {error}" if line else f"{name}: {error}")
    return out


def line_of(node: yaml.Node, path: str) -> int | None:
    """The 1-based line of the deepest key or item of ``path`` the tree has; None when
    not even its first part is there. Keys may hold dots (model ids such as
    ``llama-3.1-70b``): the longest key that the path continues is taken."""
    line, rest = None, path
    while rest:
        if isinstance(node, yaml.MappingNode):
            found = _key(node, rest)
            if found is None:
                break
            key, node = found
            line, rest = key.start_mark.line + 1, rest[len(key.value) :].removeprefix(".")
        elif isinstance(node, yaml.SequenceNode) and rest.startswith("["):
            index, _, rest = rest[1:].partition("]")
            if not index.isdigit() or int(index) >= len(node.value):
                break
            node = node.value[int(index)]
            line, rest = node.start_mark.line + 1, rest.removeprefix(".")
        else:
            break
    return line


def _key(node: yaml.MappingNode, rest: str) -> tuple[yaml.ScalarNode, yaml.Node] | None:
    best: tuple[yaml.ScalarNode, yaml.Node] | None = None
    for key, value in node.value:
        name = key.value if isinstance(key, yaml.ScalarNode) else None
        if name is None or not rest.startswith(name):
            continue
        whole = len(rest) == len(name) or rest[len(name)] in ".["
        if whole and (best is None or len(name) > len(best[0].value)):
            best = (key, value)
    return best
