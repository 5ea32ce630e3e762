"""docs/errors.md: every row of the table of errors names a test that exists, and the count it states is the
number of rows."""
import ast
import re

from tests.torchrun_utils import REPO

TABLE = REPO / "docs" / "errors.md"
ROW = re.compile(r"^\| (\d+) \|")
REFERENCE = re.compile(r"`((?:[\w/]+/)?test_\w+\.py)?::(\w+)(?:\[[^\]]*\])?`")


def rows():
    return [line for line in TABLE.read_text().splitlines() if ROW.match(line)]


def test_rows_are_numbered_in_order_and_counted_in_the_header():
    numbers = [int(ROW.match(line).group(1)) for line in rows()]
    assert numbers == list(range(1, len(numbers) + 1))
    assert f"**{len(numbers)} classes of errors**" in TABLE.read_text()


def test_every_row_names_an_existing_test():
    defined: dict[str, set[str]] = {}

    def tests_of(path: str) -> set[str]:
        if path not in defined:
            tree = ast.parse((REPO / "tests" / path).read_text())
            defined[path] = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        return defined[path]

    missing, last_file, last_references = [], None, []
    for line in rows():
        test_cell = line.rstrip(" |").rsplit(" | ", 1)[1]
        if test_cell.strip() == "same" or test_cell.startswith("same "):
            references = last_references
        else:
            references = []
            for file, name in REFERENCE.findall(test_cell):
                last_file = file or last_file
                references.append((last_file, name))
        assert references, f"no test named in: {line}"
        missing += [f"{file}::{name}" for file, name in references if name not in tests_of(file)]
        last_references = references
    assert missing == []
