"""What type checkers see of the library: the README's controller example
(tests/readme_controller.py, a copy) passes ``mypy --strict`` as written;
mypy refuses what the client's types refuse (unknown attribute words, advice
and filter names, fields a view does not have, writes to a view, a host's
value before ``ok`` says there is one); and every attribute word is a field
of ``Vma`` declared with its type, reading its own message field. Runs
without root.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import typing

import pytest
from google.protobuf.descriptor import FieldDescriptor

from vmctl_api import vmctl_pb2 as pb
from vmctl_api.words import VMA_FIELDS
from vmctl_client import Vma

pytestmark = pytest.mark.unprivileged

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = pathlib.Path(__file__).with_name("readme_controller.py")


def _mypy(path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on ``path`` with the project's settings, no cache."""
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", os.devnull, str(path)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_the_readme_controller_passes_mypy_strict() -> None:
    result = _mypy(EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr


MISUSES = """\
from vmctl_client import Client, Fleet

def misuse(c: Client) -> None:
    info = c.get_vma_info(1, attrs=("rss", "colour"))
    vma = info.vmas[0]
    vma.rss = 0
    c.advise_ranges(1, [vma], "evaporate")
    c.advise_ranges(1, [vma], "cold", filter="purple")
    print(vma.rsss)
    reveal_type(vma.rss)
    reveal_type(vma.kind)
    for host in Fleet(["unix:///x"]).run(lambda c: c.node_info()):
        print(host.value.hostname)
"""
# line: what mypy says there
EXPECTED = {
    4: r"error: .*attrs.*incompatible type.*colour",
    6: r'error: Trying to assign name "rss" that is not in "__slots__"',
    7: r"""error: Argument 3 to "advise_ranges" .*Literal\['evaporate'\]""",
    8: r"""error: Argument "filter" to "advise_ranges" .*Literal\['purple'\]""",
    9: r'error: "Vma" has no attribute "rsss"',
    10: r'note: Revealed type is "int"',
    11: r"""note: Revealed type is "Literal\['anonymous'\] \| Literal\['file'\]""",
    13: r'error: Item "None" of "NodeInfo \| None" has no attribute "hostname"',
}


def test_mypy_refuses_what_the_types_refuse(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "misuse.py"
    source.write_text(MISUSES)
    result = _mypy(source)
    said: dict[int, list[str]] = {}
    for line, message in re.findall(r"^[^:\n]*misuse\.py:(\d+): (.*)$", result.stdout, re.MULTILINE):
        said.setdefault(int(line), []).append(message)
    assert set(said) == set(EXPECTED), result.stdout
    for line, pattern in EXPECTED.items():
        assert any(re.search(pattern, message) for message in said[line]), (line, said[line])


def _distinct_vma() -> pb.Vma:
    """A Vma message whose every field holds a value no other field holds."""
    message = pb.Vma(kind=pb.VMA_KIND_FILE)
    for i, field in enumerate(pb.Vma.DESCRIPTOR.fields, start=100):
        if field.name == "kind":
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            setattr(message, field.name, f"text {i}")
        elif field.type == FieldDescriptor.TYPE_BYTES:
            setattr(message, field.name, bytes([i]))
        elif field.type == FieldDescriptor.TYPE_BOOL:
            setattr(message, field.name, True)
        else:
            setattr(message, field.name, i)
    return message


def test_every_attribute_word_is_a_declared_field_that_reads_its_own() -> None:
    declared = typing.get_type_hints(Vma)
    message = _distinct_vma()
    vma = Vma(message)
    for word, field in VMA_FIELDS.items():
        if word == "kind":
            assert vma.kind == "file"
            continue
        value = getattr(message, field)
        assert declared[word] is type(value), word
        assert getattr(vma, word) == value, word


def test_the_readme_shows_exactly_the_checked_example() -> None:
    """The README's controller is this file, word for word: what mypy checks is what readers copy."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index('```python\n"""A node-memory controller')
    block = readme[start + len("```python\n") : readme.index("\n```", start)] + "\n"
    assert block == EXAMPLE.read_text()
