"""A damaged or foreign store file stops every command with one clear line, never a traceback."""

from __future__ import annotations

import random

import duckdb
import pytest
from typer.testing import CliRunner

from cegraph.daemon.cli.main import app
from cegraph.daemon.events import Event
from cegraph.daemon.store import EventStore


def _good(path) -> bytes:
    store = EventStore(path)
    store.append([Event("Test", f"k{i}", {"i": i}) for i in range(200)])
    store.close()
    return path.read_bytes()


def _flip_blocks(data: bytes) -> bytes:
    damaged = bytearray(data)
    for position in range(8192, len(damaged), 997):  # past the headers: the checksummed blocks
        damaged[position] ^= 0xFF
    return bytes(damaged)


DAMAGE = {
    "random bytes": lambda data, path: path.write_bytes(random.Random(1).randbytes(len(data))),
    "truncated": lambda data, path: path.write_bytes(data[: len(data) // 3]),
    "empty": lambda data, path: path.write_bytes(b""),
    "broken header": lambda data, path: path.write_bytes(b"\xff" * 64 + data[64:]),
    "a text file": lambda data, path: path.write_text("not a database\n"),
    "damaged blocks": lambda data, path: path.write_bytes(_flip_blocks(data)),
    "another program's DuckDB file": lambda data, path: (
        duckdb.connect(str(path)).execute("CREATE TABLE events (x INTEGER)").close()
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["stats", "rebuild", "run"])
def test_a_damaged_store_stops_the_command_with_one_line(tmp_path, monkeypatch, damage, command):
    data = _good(tmp_path / "good.duckdb")
    path = tmp_path / "cegraph.duckdb"
    DAMAGE[damage](data, path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CEGRAPH_STORE__PATH", str(path))
    monkeypatch.setenv("CEGRAPH_HTTP__PORT", "1")  # no daemon answers there: the CLI reads the file
    result = CliRunner().invoke(app, [command])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.startswith("cegraph:")]
    assert len(lines) == 1 and str(path) in lines[0].replace("\n", ""), result.stderr
