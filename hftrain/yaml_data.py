"""YAML read as data, within bounds: recipes, overrides and the recipe an export carries.

`yaml.safe_load` never runs code, but a few hundred bytes of anchors and aliases (`&a [*b, *b,
...]`, the "billion laughs") describe a value of billions of elements: PyYAML shares the
aliased objects, so loading is cheap, and the first `repr` in an error message, deep copy or
`json.dumps` of it then takes gigabytes and minutes. The composed node graph is measured first
(each shared node counted once per use, memoised, so the count costs the file's size), and a
document that expands past `MAX_VALUES` is refused as invalid YAML. PyYAML offers no such
limit (ruamel.yaml neither), hence this module.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_VALUES = 100_000
"""Scalars, lists and mappings a document may expand to: recipes hold a few hundred."""


class YamlTooLarge(yaml.YAMLError):
    """A document that expands past `MAX_VALUES` values, or nests past Python's stack."""


def load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)`, refusing (`YamlTooLarge`, a `yaml.YAMLError`) a document that
    expands to more than `MAX_VALUES` values through aliases or nests too deep to read."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values = _expanded_size(node, {})
        if values > MAX_VALUES:
            raise YamlTooLarge(f"it expands to more than {MAX_VALUES:,} values through "
                               "anchors and aliases (&name, *name)")
        return loader.construct_document(node)
    except RecursionError:
        raise YamlTooLarge("it nests lists or mappings too deeply to read") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values `node` stands for once every alias is written out; `sizes` memoises shared
    nodes, so each distinct node is visited once."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = MAX_VALUES + 1  # a node that contains itself expands without end
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(key, sizes) + _expanded_size(value, sizes)
                       for key, value in node.value)
    else:
        size = 1
    sizes[id(node)] = min(size, MAX_VALUES + 1)  # no huge integers for deep bombs
    return sizes[id(node)]
