"""The fuzz suite drives at least 200 bad inputs that must pass, across API, CLI and server."""

from __future__ import annotations

from tests.fuzz.test_fuzz_api import API_CASES
from tests.fuzz.test_fuzz_cli import CLI_CASES
from tests.fuzz.test_fuzz_server import SERVER_CASES


def test_at_least_200_bad_inputs_each_with_a_unique_id() -> None:
    cases = API_CASES + CLI_CASES + SERVER_CASES
    known_gaps = [c for c in cases if c.gap]
    assert len(cases) - len(known_gaps) >= 200, (len(cases), len(known_gaps))
    # Every surface is covered, every command among them.
    assert min(len(API_CASES), len(CLI_CASES), len(SERVER_CASES)) >= 50
    commands = {c.args[0] for c in CLI_CASES if c.args}
    assert {"index", "ask", "eval", "bench", "demo", "serve"} <= commands
    for table in (API_CASES, CLI_CASES, SERVER_CASES):
        ids = [c.id for c in table]
        assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
